//! `herald channels …`: an operator's view of the channels: their limits, why Meta's answers
//! paused one, their sends by status; and resuming a paused channel. JSON, one object per line.
//! (Connecting channels comes with the HTTP API.)

use clap::Subcommand;
use herald_engine::{Clock, SystemClock};
use serde_json::json;
use uuid::Uuid;

use crate::settings::Settings;

#[derive(Subcommand)]
pub enum ChannelsCommand {
    /// Every channel (secrets left out), with its sends by status.
    List,
    /// Send again through a channel Meta's answers paused (after fixing the cause).
    Resume { id: Uuid },
}

pub async fn run(
    settings: Settings,
    command: ChannelsCommand,
) -> Result<(), Box<dyn std::error::Error>> {
    let store = crate::open_store(&settings).await?;
    let delivery = store.delivery();
    match command {
        ChannelsCommand::List => {
            for channel in delivery.channels().await? {
                let counts: serde_json::Map<String, serde_json::Value> = delivery
                    .send_counts(Some(channel.id))
                    .await?
                    .into_iter()
                    .map(|c| (c.status.as_str().to_owned(), json!(c.count)))
                    .collect();
                let mut line = serde_json::to_value(&channel)?;
                line["sends"] = serde_json::Value::Object(counts);
                println!("{line}");
            }
        }
        ChannelsCommand::Resume { id } => {
            if !delivery
                .pause_channel(id, None, false, SystemClock.now())
                .await?
            {
                return Err(format!("no channel {id}").into());
            }
            println!("{}", json!({ "resumed": id }));
        }
    }
    Ok(())
}
