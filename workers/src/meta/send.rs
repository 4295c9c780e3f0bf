//! The send worker: one job per message, rate-limited by the engine before it starts.
//!
//! # What Herald guarantees
//!
//! - A send is recorded (`sending`, with the time) before Meta is called: by the claim of its
//!   job where the store can ([`herald_engine::delivery::BegunSends`]), else by this worker's
//!   first step. If the answer is lost (timeout, dropped connection, crash of the worker, also
//!   one between the claim and the call), the send is `unknown`: Meta may have it.
//! - An attempt that stops before any byte of its request left the process (held back, no
//!   connection, a database error, dropped by a timeout or a shutdown, or its begin committed
//!   with its answer lost) puts the send back to `queued`, with a compare-and-set on the
//!   begin's `requested_at`, so it cannot touch a lost answer or a later attempt's request.
//! - An unknown send is resent only if no status webhook for it (matched by our send id, which
//!   travels as `biz_opaque_callback_data` on WhatsApp and `metadata` on Messenger and
//!   Instagram) arrived within the grace period after the request. A status that arrives at any
//!   time settles the send; it is never sent again after that.
//! - So a message is sent twice only if Meta got the lost request *and* its status webhook did
//!   not reach Herald within the grace period (Meta retries webhooks for days; the default grace
//!   is 10 minutes). It is never silently dropped: every send ends `accepted` or later, or
//!   `failed` with Meta's reason.
//! - Meta's message id is recorded with the job's completion, in the same statement on
//!   PostgreSQL. If the process dies after Meta's answer and before that write, the send is
//!   left `sending` and is treated like a lost answer: the job is rescued, and the send waits
//!   for its status webhook through the grace period.
//! - Limits are taken before the call: the channel's rate by the engine's admission (the job
//!   is claimed only with a permit), the pair rate and the messaging tier here. A send that
//!   waits for one of them gives the channel's permit back and snoozes until it is due.
//! - The moment of the request is checked too, against the channel's arrival rate (Meta's
//!   `mps` with a burst of `meta_burst_ms`), by every process together: a send held up since
//!   its claim (a slow write, a stalled process) while later sends went out would bunch with
//!   them, so it goes back to the queue instead, keeping no slot, and is claimed again with a
//!   fresh permit. While the limiter runs at full rate (not in fallback) this bounds the
//!   bunching at Meta to the arrival burst, whatever the delays between claims and requests.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use herald_engine::delivery::{
    ChannelAdmission, Message, Platform, RequestGate, SendArgs, SendRecord, SendStatus, SendUpdate,
    SEND_KIND,
};
use herald_engine::model::Effect;
use herald_engine::{Backoff, Clock, JobContext, JobError, KindPolicy, Store, Worker};
use tracing::{debug, info, warn};

use super::client::{MetaClient, SendError};
use super::policy::{classify, pair_backoff, Action};
use super::recorder::Recorder;

/// Settings of the send worker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SendConfig {
    /// How long an unknown send waits for a status webhook before it is sent again. Long enough
    /// for Meta's status webhook to arrive (seconds) even through a short outage of ours.
    pub unknown_grace: Duration,
    /// A send whose channel is paused looks again this often.
    pub paused_recheck: Duration,
    /// Usage headers above this percentage slow the channel before Meta refuses.
    pub usage_slowdown_percent: f64,
    /// The customer service window: free-form messages only this long after the user's last
    /// message (WhatsApp).
    pub service_window: Duration,
    /// An attempt that takes longer (a database that hangs, a stalled process) is ended by the
    /// worker itself, which then settles what it began: a request not made goes back to the
    /// queue, one in flight counts as a lost answer, and on the job's last attempt the send
    /// fails with the reason rather than be left without a job. The engine's own timeout for
    /// the job is 10 s more, a backstop.
    pub attempt_timeout: Duration,
}

impl Default for SendConfig {
    fn default() -> Self {
        SendConfig {
            unknown_grace: herald_engine::delivery::DEFAULT_UNKNOWN_GRACE,
            paused_recheck: Duration::from_secs(5),
            usage_slowdown_percent: 90.0,
            service_window: Duration::from_secs(24 * 3600),
            attempt_timeout: Duration::from_secs(50),
        }
    }
}

/// Performs [`SEND_KIND`] jobs.
pub struct SendWorker {
    store: Arc<dyn Store>,
    admission: Arc<ChannelAdmission>,
    client: MetaClient,
    clock: Arc<dyn Clock>,
    config: SendConfig,
    recorder: Recorder,
}

impl SendWorker {
    pub fn new(
        store: Arc<dyn Store>,
        admission: Arc<ChannelAdmission>,
        client: MetaClient,
        clock: Arc<dyn Clock>,
        config: SendConfig,
    ) -> Self {
        SendWorker {
            recorder: Recorder::start(store.clone(), clock.clone()),
            store,
            admission,
            client,
            clock,
            config,
        }
    }

    /// Gives the channel's permit back and waits: the send did not use its slot of the limit.
    async fn wait(&self, channel: uuid::Uuid, after: Duration) -> JobError {
        self.admission.give_back(channel).await;
        JobError::Snooze(after)
    }

    /// Back to `queued`: the request this attempt began (`send` as begun) did not leave the
    /// process, whether Herald held it back or the transport could not send a byte of it. The
    /// attempt no longer holds the send, so a failure after this leaves it as it is.
    async fn unsent(&self, send: &SendRecord, stage: &mut Stage) -> Result<(), JobError> {
        // Should this write fail, the attempt's failure path undoes the begin again.
        *stage = Stage::Begun(send.requested_at);
        if let Some(requested_at) = send.requested_at {
            self.update(send.id, SendUpdate::Unsent { requested_at })
                .await?;
        }
        *stage = Stage::Start;
        Ok(())
    }

    /// Back to `queued` with Meta's refusal: the request was answered, so the attempt no
    /// longer holds the send.
    async fn refuse(
        &self,
        send: uuid::Uuid,
        code: Option<i64>,
        why: &str,
        stage: &mut Stage,
    ) -> Result<(), JobError> {
        self.update(send, refused(code, why)).await?;
        *stage = Stage::Start;
        Ok(())
    }

    async fn update(&self, send: uuid::Uuid, update: SendUpdate) -> Result<(), JobError> {
        self.store
            .delivery()
            .update_send(send, &update, self.clock.now())
            .await
            .map(|_| ())
            .map_err(JobError::retry)
    }

    /// Marks the send failed for good, and the job with it.
    async fn fail(&self, send: uuid::Uuid, code: Option<i64>, why: String) -> JobError {
        if let Err(e) = self
            .store
            .delivery()
            .update_send(
                send,
                &SendUpdate::Failed {
                    code,
                    error: why.clone(),
                },
                self.clock.now(),
            )
            .await
        {
            return JobError::retry(e);
        }
        JobError::Discard(why)
    }
}

#[async_trait]
impl Worker for SendWorker {
    type Args = SendArgs;
    const KIND: &'static str = SEND_KIND;

    fn policy(&self) -> KindPolicy {
        KindPolicy {
            backoff: Backoff::default(),
            // Longer than the worker's own, so the worker settles its send first.
            timeout: self.config.attempt_timeout + Duration::from_secs(10),
        }
    }

    async fn work(&self, args: SendArgs, ctx: &JobContext) -> Result<(), JobError> {
        let mut held = Held {
            stage: Stage::Start,
            send_id: args.send_id,
            store: self.store.clone(),
            clock: self.clock.clone(),
        };
        let timeout = self.config.attempt_timeout;
        let attempt = self.attempt(&args, ctx, &mut held.stage);
        let result = match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) if held.stage == Stage::Called => {
                // Meta may have it: a lost answer. Should the write fail, the send stays
                // `sending`, which the next attempt also takes for a lost answer; a snooze
                // keeps the job (it counts no attempt), even on its last attempt.
                held.stage = Stage::Start;
                let why = format!("no answer within the attempt's {timeout:?}");
                let _ = self
                    .update(args.send_id, SendUpdate::Unknown { error: why })
                    .await;
                return Err(JobError::Snooze(self.config.unknown_grace));
            }
            Err(_) => Err(JobError::retry(format!(
                "the attempt took longer than {timeout:?} before its request"
            ))),
        };
        let Err(JobError::Retry { error, .. }) = &result else {
            held.stage = Stage::Start;
            return result;
        };
        if let Some(requested_at) = held.stage.unmade_request() {
            // This attempt began the send (or may have: its write failed) and failed before
            // Meta was called (a database error, say): the send must not look like a request
            // whose answer was lost, or it would wait out the grace period. Only this begin
            // is undone: a send found `unknown` (an earlier attempt's lost answer) stays so.
            let _ = self
                .store
                .delivery()
                .update_send(
                    args.send_id,
                    &SendUpdate::Unsent { requested_at },
                    self.clock.now(),
                )
                .await;
        }
        held.stage = Stage::Start;
        if ctx.job.attempt >= ctx.job.max_attempts {
            // The job's last attempt: the send fails with it rather than stay open for ever.
            // If even that write fails, the job stays (a snooze counts no attempt): a send is
            // never left open without a job.
            let why = format!("gave up after {} attempts: {error}", ctx.job.attempt);
            return Err(match self.fail(args.send_id, None, why).await {
                JobError::Retry { .. } => JobError::Snooze(LAST_ATTEMPT_RECHECK),
                other => other,
            });
        }
        result
    }
}

/// A last attempt that could not mark its send failed runs again after this.
const LAST_ATTEMPT_RECHECK: Duration = Duration::from_secs(30);

/// How far an attempt got, for what a failure leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Not holding its send: the send is as this attempt found it.
    Start,
    /// A write that begins the send with this request time is under way or failed: it may
    /// have committed (its answer lost or not read yet). Meta has not been called.
    Beginning(DateTime<Utc>),
    /// The send is `sending` for this attempt, requested at this time (None only for a row
    /// without one, which cannot be told from another begin), and Meta has not been called.
    Begun(Option<DateTime<Utc>>),
    /// Meta was called: the answer decides.
    Called,
}

impl Stage {
    /// The request time of a begin of this attempt's whose request was not made.
    fn unmade_request(self) -> Option<DateTime<Utc>> {
        match self {
            Stage::Beginning(at) => Some(at),
            Stage::Begun(at) => at,
            Stage::Start | Stage::Called => None,
        }
    }
}

/// An attempt's hold on its send, for an attempt that does not finish: a handler timeout, a
/// panic or a shutdown drops it between the begin and the call, and a send left `sending`
/// would wait out the grace period as if its answer had been lost. Dropped so, it undoes its
/// begin (on a task of its own: drop cannot wait), unless the send moved on since.
struct Held {
    stage: Stage,
    send_id: uuid::Uuid,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let Some(requested_at) = self.stage.unmade_request() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (store, clock, send) = (self.store.clone(), self.clock.clone(), self.send_id);
        runtime.spawn(async move {
            let undone = store
                .delivery()
                .update_send(send, &SendUpdate::Unsent { requested_at }, clock.now())
                .await;
            debug!(%send, ?undone, "an attempt ended between its begin and its call");
        });
    }
}

impl SendWorker {
    async fn attempt(
        &self,
        args: &SendArgs,
        ctx: &JobContext,
        stage: &mut Stage,
    ) -> Result<(), JobError> {
        let delivery = self.store.delivery();
        // The common case: the claim of this job began its send (`sending`, recorded before
        // the call) in the claim's own statement. Else the worker begins it, batched with the
        // other sends in flight; a send that was not queued takes the careful path.
        let taken = ctx
            .job
            .attempted_at
            .and_then(|claimed| delivery.take_begun(args.send_id, ctx.job.id, claimed));
        let begun = match taken {
            Some(send) => Some(send),
            None => match self.recorder.begin(args.send_id).await {
                Ok(begun) => begun,
                Err(failed) => {
                    if let Some(at) = failed.at {
                        *stage = Stage::Beginning(at);
                    }
                    return Err(JobError::retry(failed.error));
                }
            },
        };
        let send = match begun {
            Some(send) => send,
            None => match self.resume(args, ctx, stage).await? {
                Some(send) => send,
                None => return Ok(()),
            },
        };
        *stage = Stage::Begun(send.requested_at);
        let channel = match self.admission.channel(send.channel_id).await {
            Some(channel) => channel,
            // The admission's cache may be older than the channel (connected since its last
            // reload): only the database can say that the channel is gone.
            None => match delivery
                .channel(send.channel_id)
                .await
                .map_err(JobError::retry)?
            {
                Some(channel) => {
                    self.admission.invalidate();
                    Arc::new(channel)
                }
                None => {
                    self.unsent(&send, stage).await?;
                    return Err(self
                        .fail(send.id, None, "the channel no longer exists".into())
                        .await);
                }
            },
        };
        if channel.paused_for(send.lane) {
            self.unsent(&send, stage).await?;
            return Err(self.wait(channel.id, self.config.paused_recheck).await);
        }
        let now = self.clock.now();
        if channel.platform == Platform::Whatsapp {
            let tiered = channel.limits.tier.is_some()
                && channel.portfolio_id.is_some()
                && matches!(send.message, Message::Template { .. });
            if send.message.needs_window() || tiered {
                let last = delivery
                    .last_inbound(channel.id, &send.recipient)
                    .await
                    .map_err(JobError::retry)?;
                let window = herald_engine::model::chrono_duration(self.config.service_window);
                let in_window = last.is_some_and(|at| now - at < window);
                if !in_window && send.message.needs_window() {
                    self.unsent(&send, stage).await?;
                    return Err(self
                        .fail(
                            send.id,
                            Some(131047),
                            "outside the 24 h customer service window: only a template may be sent"
                                .into(),
                        )
                        .await);
                }
                if let (false, true, Some(tier), Some(portfolio)) = (
                    in_window,
                    tiered,
                    channel.limits.tier,
                    &channel.portfolio_id,
                ) {
                    let full = delivery
                        .reserve_reach(portfolio, &send.recipient, tier, now)
                        .await
                        .map_err(JobError::retry)?;
                    if let Some(frees) = full {
                        // Spread the waiters over the next minutes: they would all wake when
                        // the first unit frees, and all but one would wait again.
                        let wait = (frees - now).to_std().unwrap_or(Duration::from_secs(60))
                            + Duration::from_secs(fastrand::u64(0..600));
                        info!(send = %send.id, ?wait, "messaging tier used up: waiting");
                        self.unsent(&send, stage).await?;
                        return Err(self.wait(channel.id, wait).await);
                    }
                }
            }
        }
        match self.admission.at_request(&channel, &send.recipient).await {
            RequestGate::Go => {}
            RequestGate::Pair(wait) => {
                self.unsent(&send, stage).await?;
                return Err(self.wait(channel.id, wait).await);
            }
            RequestGate::Ahead(wait) => {
                // Held up since its claim while later sends went out: sent now it would bunch
                // with them. Back to the queue, to be claimed with a fresh permit; the old one
                // is not given back, its moment has passed.
                debug!(send = %send.id, ?wait, "send ahead of the channel's pace: back to the queue");
                self.unsent(&send, stage).await?;
                return Err(JobError::Snooze(wait));
            }
        }
        let callback = send.id.to_string();
        *stage = Stage::Called;
        let result = self
            .client
            .send(
                &channel,
                &send.recipient,
                &send.message,
                send.lane,
                &callback,
            )
            .await;
        match result {
            Ok(accepted) => {
                if accepted
                    .usage_percent
                    .is_some_and(|p| p >= self.config.usage_slowdown_percent)
                {
                    self.admission.slow_down(channel.id);
                }
                // Written with the job's completion, in its statement where the store can.
                ctx.complete_with(Effect::SendAccepted {
                    send_id: send.id,
                    provider_message_id: accepted.message_id,
                });
                Ok(())
            }
            Err(SendError::Lost(why)) => {
                self.update(send.id, SendUpdate::Unknown { error: why })
                    .await?;
                // Not a failure: wait for the status webhook; resend after the grace period.
                Err(JobError::Snooze(self.config.unknown_grace))
            }
            Err(SendError::NotSent(why)) => {
                self.unsent(&send, stage).await?;
                Err(self.last_attempt(ctx, send.id, None, why).await)
            }
            Err(SendError::BadChannel(why)) => {
                self.unsent(&send, stage).await?;
                warn!(channel = %channel.id, %why, "pausing the channel");
                delivery
                    .pause_channel(channel.id, Some(&why), false, self.clock.now())
                    .await
                    .map_err(JobError::retry)?;
                self.admission.invalidate();
                Err(JobError::Snooze(self.config.paused_recheck))
            }
            Err(SendError::Unsupported(why)) => {
                self.unsent(&send, stage).await?;
                Err(self.fail(send.id, None, why).await)
            }
            Err(SendError::Meta { status, error }) => {
                let code = error.code;
                let why = format!("Meta error {}: {}", code.unwrap_or(0), error.message);
                match classify(code, status) {
                    Action::Retry => {
                        self.refuse(send.id, code, &why, stage).await?;
                        Err(self.last_attempt(ctx, send.id, code, why).await)
                    }
                    Action::SlowChannel { retry_after } => {
                        self.refuse(send.id, code, &why, stage).await?;
                        self.admission.slow_down(channel.id);
                        Err(JobError::Snooze(jitter(retry_after)))
                    }
                    Action::RetryRecipient => {
                        self.refuse(send.id, code, &why, stage).await?;
                        // `requests` counts this request too: the hits before it are one
                        // fewer (the first 131056 waits 4^0 = 1 s).
                        let hits = u32::try_from(send.requests.saturating_sub(1)).unwrap_or(0);
                        Err(JobError::Snooze(pair_backoff(hits)))
                    }
                    Action::Wait { retry_after } => {
                        self.refuse(send.id, code, &why, stage).await?;
                        Err(JobError::Snooze(jitter(retry_after)))
                    }
                    Action::PauseChannel {
                        reason,
                        broadcasts_only,
                    } => {
                        self.refuse(send.id, code, &why, stage).await?;
                        let reason = format!("{reason} [{why}]");
                        warn!(channel = %channel.id, %reason, "pausing the channel");
                        delivery
                            .pause_channel(
                                channel.id,
                                Some(&reason),
                                broadcasts_only,
                                self.clock.now(),
                            )
                            .await
                            .map_err(JobError::retry)?;
                        self.admission.invalidate();
                        Err(JobError::Snooze(self.config.paused_recheck))
                    }
                    Action::Permanent { reason, opt_out } => {
                        if opt_out {
                            // Contacts (and their opt-out flag) arrive with the HTTP API; until
                            // then the failed send carries the reason.
                            info!(send = %send.id, "recipient opted out of marketing messages");
                        }
                        Err(self.fail(send.id, code, format!("{reason}: {why}")).await)
                    }
                }
            }
        }
    }
}

impl SendWorker {
    /// The careful path for a send that was not queued: settled already (nothing to do), or
    /// an earlier request's answer was lost (wait out the grace period, then send again).
    /// Returns the send, marked as requested, when it is to be sent now.
    async fn resume(
        &self,
        args: &SendArgs,
        ctx: &JobContext,
        stage: &mut Stage,
    ) -> Result<Option<SendRecord>, JobError> {
        let delivery = self.store.delivery();
        let Some(send) = delivery.send(args.send_id).await.map_err(JobError::retry)? else {
            return Err(JobError::Discard(format!(
                "send {} not found",
                args.send_id
            )));
        };
        if send.status.is_settled() {
            // Meta has it (a status webhook reconciled a lost answer) or it failed for good.
            self.admission.give_back(send.channel_id).await;
            return Ok(None);
        }
        let now = self.clock.now();
        if let (Some(claimed), Some(lease)) = (ctx.job.attempted_at, ctx.job.lease_expires_at) {
            if now < lease
                && herald_engine::delivery::send_of_job(&ctx.job) == Some(send.id)
                && send.workspace_id == ctx.job.workspace_id
                && herald_engine::delivery::begun_by_claim(&send, claimed)
            {
                // This attempt's own claim began it and its record did not reach us (it did
                // not decode, say): no request has been made for it since.
                return Ok(Some(send));
            }
        }
        if matches!(send.status, SendStatus::Sending | SendStatus::Unknown) {
            // An earlier request's answer was lost (or its worker died mid-call).
            let requested = send.requested_at.unwrap_or(send.updated_at);
            let grace_ends = herald_engine::model::later(requested, self.config.unknown_grace);
            if now < grace_ends {
                if send.status == SendStatus::Sending {
                    self.update(
                        send.id,
                        SendUpdate::Unknown {
                            error: "the worker stopped during the request".into(),
                        },
                    )
                    .await?;
                }
                let wait = (grace_ends - now).to_std().unwrap_or(Duration::ZERO);
                return Err(self.wait(send.channel_id, wait).await);
            }
            warn!(send = %send.id, "no status within the grace period: sending again");
        }
        // Until its answer says otherwise, this write may have begun the send (also if the
        // attempt is dropped while it waits).
        *stage = Stage::Beginning(now);
        let updated = delivery
            .update_send(send.id, &SendUpdate::Requesting, now)
            .await
            .map_err(JobError::retry)?;
        match updated {
            Some(s) if s.status == SendStatus::Sending => Ok(Some(s)),
            // Settled meanwhile (a status webhook arrived).
            _ => {
                *stage = Stage::Start;
                Ok(None)
            }
        }
    }

    /// A retryable failure; on the job's last attempt the send fails for good instead.
    async fn last_attempt(
        &self,
        ctx: &JobContext,
        send: uuid::Uuid,
        code: Option<i64>,
        why: String,
    ) -> JobError {
        if ctx.job.attempt >= ctx.job.max_attempts {
            return self
                .fail(
                    send,
                    code,
                    format!("gave up after {} attempts: {why}", ctx.job.attempt),
                )
                .await;
        }
        JobError::retry(why)
    }
}

/// Back to `queued` after Meta refused the request, keeping Meta's reason.
fn refused(code: Option<i64>, why: &str) -> SendUpdate {
    SendUpdate::Refused {
        code,
        error: why.to_owned(),
    }
}

/// `d` plus up to 20% at random, so that refused sends do not come back in lockstep.
fn jitter(d: Duration) -> Duration {
    d + d.mul_f64(fastrand::f64() * 0.2)
}
