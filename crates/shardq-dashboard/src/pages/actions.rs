//! Actions: cancel a job, retry a job, retry the discarded jobs of a kind on
//! a shard, pause or resume a queue on a shard. `GET /actions/confirm`
//! shows what will be done and asks for the token (when one is set);
//! `POST /actions` checks it, does it, logs it and shows the outcome.
//! Read-only dashboards answer 403 to both.

use std::net::SocketAddr;

use askama::Template;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::response::Html;
use axum::Form;
use serde::Deserialize;
use shardq::JobId;

use super::layout::{self, field, Nav};
use crate::display;
use crate::error::{Error, Result};
use crate::state::Dashboard;
use crate::store;

/// Who sent a request, as far as the connection tells (absent when the
/// application serving the router does not record peer addresses).
pub struct Peer(Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(addr)| *addr),
        ))
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => write!(f, "{addr}"),
            None => f.write_str("unknown peer"),
        }
    }
}

/// The fields of an action's form (and of its confirmation link).
#[derive(Debug, Default, Deserialize)]
pub struct ActionForm {
    action: Option<String>,
    job: Option<String>,
    shard: Option<String>,
    queue: Option<String>,
    kind: Option<String>,
    token: Option<String>,
}

/// An action, checked.
#[derive(Debug)]
enum Action {
    Cancel(JobId),
    Retry(JobId),
    RetryDiscarded { shard: String, kind: String },
    Pause { shard: String, queue: String },
    Resume { shard: String, queue: String },
}

impl Action {
    /// The action the form names, every field checked; nothing is read or
    /// written yet.
    fn parse(dashboard: &Dashboard, form: &ActionForm) -> Result<Action> {
        let required = |name: &'static str, value: &Option<String>| {
            field(value).ok_or_else(|| Error::BadInput {
                field: name,
                message: "missing".to_string(),
            })
        };
        let job = || -> Result<JobId> {
            let text = required("job", &form.job)?;
            let id: JobId = text.parse().map_err(|e| Error::BadInput {
                field: "job",
                message: format!("{e}"),
            })?;
            dashboard.router().shard(&id.shard)?;
            Ok(id)
        };
        let shard = || -> Result<String> {
            let name = required("shard", &form.shard)?;
            dashboard.router().shard(&name)?;
            Ok(name)
        };
        let action = required("action", &form.action)?;
        Ok(match action.as_str() {
            "cancel" => Action::Cancel(job()?),
            "retry" => Action::Retry(job()?),
            "retry-discarded" => Action::RetryDiscarded {
                shard: shard()?,
                kind: required("kind", &form.kind)?,
            },
            "pause" => Action::Pause {
                shard: shard()?,
                queue: required("queue", &form.queue)?,
            },
            "resume" => Action::Resume {
                shard: shard()?,
                queue: required("queue", &form.queue)?,
            },
            other => {
                return Err(Error::BadInput {
                    field: "action",
                    message: format!("unknown action {other:?}; one of cancel, retry, retry-discarded, pause, resume"),
                })
            }
        })
    }

    /// What it does, in words.
    fn describe(&self) -> String {
        match self {
            Action::Cancel(id) => format!("cancel job {id}"),
            Action::Retry(id) => format!("retry job {id}"),
            Action::RetryDiscarded { shard, kind } => format!(
                "retry the discarded jobs of kind {kind:?} on shard {shard} (up to {} among its {} most recently finished jobs)",
                store::RETRY_LIMIT,
                display::count(store::RETRY_SCAN_CAP, false)
            ),
            Action::Pause { shard, queue } => format!("pause queue {queue:?} on shard {shard}"),
            Action::Resume { shard, queue } => format!("resume queue {queue:?} on shard {shard}"),
        }
    }

    /// The form's hidden fields that say it again.
    fn fields(&self) -> Vec<Hidden> {
        let h = |name: &'static str, value: &str| Hidden {
            name,
            value: value.to_string(),
        };
        match self {
            Action::Cancel(id) => vec![h("action", "cancel"), h("job", &id.to_string())],
            Action::Retry(id) => vec![h("action", "retry"), h("job", &id.to_string())],
            Action::RetryDiscarded { shard, kind } => {
                vec![h("action", "retry-discarded"), h("shard", shard), h("kind", kind)]
            }
            Action::Pause { shard, queue } => vec![h("action", "pause"), h("shard", shard), h("queue", queue)],
            Action::Resume { shard, queue } => vec![h("action", "resume"), h("shard", shard), h("queue", queue)],
        }
    }

    /// Does it; returns what happened and where to look next.
    async fn run(&self, dashboard: &Dashboard) -> Result<(String, String)> {
        let client = dashboard.client();
        let base = &dashboard.options().base;
        let job_link = |id: &JobId| format!("{base}/jobs/{}", super::jobs::encode(&id.to_string()));
        Ok(match self {
            Action::Cancel(id) => {
                let job = client.cancel(id).await?;
                (format!("job {id} is {}", job.state), job_link(id))
            }
            Action::Retry(id) => {
                let job = client.retry(id).await?;
                (format!("job {id} is {} again", job.state), job_link(id))
            }
            Action::RetryDiscarded { shard, kind } => {
                let db = dashboard.router().shard(shard)?;
                let ids = dashboard
                    .within(db, store::discarded_of_kind(&db.pool, kind))
                    .await
                    .map_err(|message| Error::Database {
                        database: format!("shard {shard}"),
                        message,
                    })?;
                let (mut retried, mut refused) = (0, Vec::new());
                for id in ids {
                    let id = JobId {
                        shard: shard.clone(),
                        id,
                    };
                    match client.retry(&id).await {
                        Ok(_) => retried += 1,
                        Err(e) => refused.push(display::error_chain(&e)),
                    }
                }
                let mut outcome = format!("retried {retried} discarded jobs of kind {kind:?} on shard {shard}");
                if !refused.is_empty() {
                    outcome.push_str(&format!("; {} refused (first: {})", refused.len(), refused[0]));
                }
                let link = format!(
                    "{base}/jobs?shard={}&kind={}",
                    super::jobs::encode(shard),
                    super::jobs::encode(kind)
                );
                (outcome, link)
            }
            Action::Pause { shard, queue } => {
                let changed = client.pause_queue(shard, queue, "dashboard").await?;
                let outcome = if changed {
                    format!("queue {queue:?} is paused on shard {shard}")
                } else {
                    format!("queue {queue:?} was paused on shard {shard} already")
                };
                (outcome, format!("{base}/queues"))
            }
            Action::Resume { shard, queue } => {
                let changed = client.resume_queue(shard, queue).await?;
                let outcome = if changed {
                    format!("queue {queue:?} is resumed on shard {shard}")
                } else {
                    format!("queue {queue:?} was not paused on shard {shard}")
                };
                (outcome, format!("{base}/queues"))
            }
        })
    }
}

struct Hidden {
    name: &'static str,
    value: String,
}

#[derive(Template)]
#[template(path = "confirm.html")]
struct ConfirmPage {
    nav: Nav,
    title: String,
    what: String,
    fields: Vec<Hidden>,
    needs_token: bool,
}

#[derive(Template)]
#[template(path = "done.html")]
struct DonePage {
    nav: Nav,
    title: String,
    outcome: String,
    link: String,
}

/// `GET /actions/confirm`: what the action will do, and the form that does it.
pub async fn confirm(State(dashboard): State<Dashboard>, Query(form): Query<ActionForm>) -> Result<Html<String>> {
    if !dashboard.actions_enabled() {
        return Err(Error::ReadOnly);
    }
    let action = Action::parse(&dashboard, &form)?;
    let page = ConfirmPage {
        nav: Nav::of(&dashboard),
        title: "Confirm".to_string(),
        what: action.describe(),
        fields: action.fields(),
        needs_token: dashboard.needs_token(),
    };
    layout::render("confirm", &page)
}

/// `POST /actions`: checks the token, runs the action, logs it.
pub async fn run(State(dashboard): State<Dashboard>, peer: Peer, Form(form): Form<ActionForm>) -> Result<Html<String>> {
    let token = field(&form.token);
    if let Err(e) = dashboard.authorize(token.as_deref()) {
        tracing::warn!(target: "shardq_dashboard::action", peer = %peer, action = ?form.action,
            job = ?form.job, shard = ?form.shard, queue = ?form.queue, kind = ?form.kind, "action refused: {e}");
        return Err(e);
    }
    let action = Action::parse(&dashboard, &form)?;
    let what = action.describe();
    match action.run(&dashboard).await {
        Ok((outcome, link)) => {
            tracing::info!(target: "shardq_dashboard::action", peer = %peer, action = %what, outcome = %outcome, "action done");
            let page = DonePage {
                nav: Nav::of(&dashboard),
                title: "Done".to_string(),
                outcome,
                link,
            };
            layout::render("done", &page)
        }
        Err(e) => {
            tracing::warn!(target: "shardq_dashboard::action", peer = %peer, action = %what, "action failed: {e}");
            Err(e)
        }
    }
}
