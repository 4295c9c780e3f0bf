//! `herald workspace create NAME | list`: the operator's way to make tenants without the API.

use clap::Subcommand;
use serde_json::json;

use crate::settings::Settings;

#[derive(Subcommand)]
pub enum WorkspaceCommand {
    /// Create a workspace and its first API key; prints both as JSON (the key only this once).
    Create {
        /// A name for people (1 to 200 characters).
        name: String,
    },
    /// List workspaces as JSON lines.
    List,
}

pub async fn run(
    settings: Settings,
    which: WorkspaceCommand,
) -> Result<(), Box<dyn std::error::Error>> {
    let store = crate::open_store(&settings).await?;
    let tenancy = store.tenancy();
    match which {
        WorkspaceCommand::Create { name } => {
            let now = chrono::Utc::now();
            let workspace = tenancy.create_workspace(&name, now).await?;
            let key = tenancy.create_api_key(workspace.id, "initial", now).await?;
            println!(
                "{}",
                json!({
                    "workspace": workspace,
                    "api_key": { "id": key.key.id, "prefix": key.key.prefix, "key": key.secret },
                })
            );
        }
        WorkspaceCommand::List => {
            let mut after = None;
            loop {
                let page = tenancy.workspaces(after, 500).await?;
                for w in &page {
                    println!("{}", json!(w));
                }
                match page.last() {
                    Some(w) if page.len() == 500 => after = Some(w.id),
                    _ => break,
                }
            }
        }
    }
    Ok(())
}
