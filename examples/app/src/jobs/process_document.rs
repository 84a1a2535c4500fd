//! `process_document`: the work a new document needs, done once.
//!
//! In one fenced transaction on the account's shard ([`crate::fenced`]):
//! lock the document, count its words, keep its first words as a summary,
//! mark it processed, and enqueue the author's statistics refresh. The follow-up exists if and only if the
//! processing committed. A rerun (the node died after the commit) finds the
//! document processed and does nothing.

use serde::{Deserialize, Serialize};
use shardq::{Account, Client, JobContext, JobError, NewJob, Worker};
use uuid::Uuid;

use crate::fenced::{begin_in_job, job_write};
use crate::jobs::{user_stats, QUEUE_DOCUMENTS};
use crate::store::{self, Processed};

/// Words kept in a processed document's summary.
pub const SUMMARY_WORDS: usize = 12;

/// The job's args.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessDocumentArgs {
    /// The document to process (of the job's account).
    pub document: Uuid,
}

/// The job that processes `document`.
pub fn job(document: Uuid) -> shardq::Result<NewJob> {
    Ok(NewJob::new(ProcessDocument::KIND, &ProcessDocumentArgs { document })?.queue(QUEUE_DOCUMENTS))
}

/// The handler.
pub struct ProcessDocument {
    /// Routes the account to its shard, enqueues the follow-up.
    pub client: Client,
}

/// A body's word count and summary.
pub fn analyse(body: &str) -> (i32, String) {
    let count = i32::try_from(body.split_whitespace().count()).unwrap_or(i32::MAX);
    let summary = body
        .split_whitespace()
        .take(SUMMARY_WORDS)
        .collect::<Vec<_>>()
        .join(" ");
    (count, summary)
}

impl Worker for ProcessDocument {
    type Args = ProcessDocumentArgs;
    const KIND: &'static str = "process_document";

    async fn work(&self, ctx: JobContext, args: ProcessDocumentArgs) -> Result<(), JobError> {
        let account = Account::new(ctx.account.as_str())?;
        job_write(|| self.process(&account, args.document)).await
    }
}

impl ProcessDocument {
    /// The job's transaction, fenced ([`crate::fenced`]).
    async fn process(&self, account: &Account, document: Uuid) -> shardq::Result<()> {
        let router = self.client.router();
        let mut tx = begin_in_job(router, account).await?;
        let db = router.shard(tx.shard())?;
        let Some(doc) = store::document_lock(&mut *tx, account.as_str(), document)
            .await
            .map_err(|e| db.error(e))?
        else {
            return Ok(()); // deleted meanwhile: nothing to process
        };
        if doc.status == "processed" {
            return Ok(()); // a rerun of a run that committed
        }
        let (word_count, summary) = analyse(&doc.body);
        let processed = Processed {
            word_count,
            summary: &summary,
        };
        store::document_set_processed(&mut *tx, account.as_str(), doc.id, &processed)
            .await
            .map_err(|e| db.error(e))?;
        if let Some(author) = doc.author {
            self.client
                .enqueue_in(&mut tx, account, user_stats::job(author)?)
                .await?;
        }
        tx.commit().await.map_err(|e| db.error(e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn analyse_counts_words_and_keeps_the_first_ones() {
        assert_eq!(analyse(""), (0, String::new()));
        assert_eq!(analyse("  one\ttwo\nthree "), (3, "one two three".into()));
        let long = (1..=20).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ");
        let (count, summary) = analyse(&long);
        assert_eq!(count, 20);
        assert_eq!(summary.split(' ').count(), SUMMARY_WORDS);
        assert!(summary.ends_with("w12"));
    }
}
