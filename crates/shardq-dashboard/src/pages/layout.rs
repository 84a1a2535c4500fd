//! What every page shares: the navigation bar's view ([`Nav`]) and turning
//! a template into a response.

use askama::Template;
use axum::response::Html;

use crate::display;
use crate::error::{Error, Result};
use crate::state::Dashboard;

/// The navigation bar: the mount path, whether actions are on, the time.
pub struct Nav {
    /// Prefix of every link (the mount path).
    pub base: String,
    /// The fleet page's link (the mount path itself, or `/`).
    pub home: String,
    /// `read-only` or `actions on`.
    pub mode: &'static str,
    /// When the page was drawn.
    pub now: String,
}

impl Nav {
    /// The bar for `dashboard`.
    pub fn of(dashboard: &Dashboard) -> Nav {
        let base = dashboard.options().base.clone();
        Nav {
            home: if base.is_empty() { "/".to_string() } else { base.clone() },
            base,
            mode: if dashboard.actions_enabled() {
                "actions on"
            } else {
                "read-only"
            },
            now: display::time(&chrono::Utc::now()),
        }
    }
}

/// Renders `page` (named `name` in errors) as HTML.
pub fn render(name: &'static str, page: &impl Template) -> Result<Html<String>> {
    page.render()
        .map(Html)
        .map_err(|source| Error::Render { page: name, source })
}

/// A query or form field: trimmed, `None` when empty.
pub fn field(value: &Option<String>) -> Option<String> {
    value
        .as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}
