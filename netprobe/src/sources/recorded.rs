//! A recorded NDJSON stream (`trace --record FILE`, the fixtures under `verdict/fixtures`) as
//! a source: its events in one batch, then exhausted. Replays a lab run through the same
//! pipeline as a live trace, without a kernel.

use std::io::BufRead;

use futures::future::LocalBoxFuture;

use crate::{
    error::{Error, Result},
    events::{Event, SCHEMA},
    session::{Input, Source},
    sinks::Summary,
};

pub struct Recorded {
    events: Option<Vec<Event>>,
    /// Lines that were not events of the current schema (verdicts and summaries are skipped
    /// silently; anything else is counted).
    malformed: u64,
}

impl Recorded {
    pub fn read(input: impl BufRead) -> Result<Self> {
        let mut events = Vec::new();
        let mut malformed = 0;
        for line in input.lines() {
            let line = line.map_err(|e| Error::io("reading a recording", e))?;
            let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else {
                malformed += 1;
                continue;
            };
            if value["schema"] != SCHEMA {
                continue;
            }
            match serde_json::from_value(value) {
                Ok(e) => events.push(e),
                Err(_) => malformed += 1,
            }
        }
        Ok(Self {
            events: Some(events),
            malformed,
        })
    }
}

impl Source for Recorded {
    fn next(&mut self) -> LocalBoxFuture<'_, Result<Input>> {
        let input = match self.events.take() {
            Some(events) => Input::Events(events),
            None => Input::Exhausted,
        };
        Box::pin(std::future::ready(Ok(input)))
    }

    fn report(&self, summary: &mut Summary) {
        summary.malformed += self.malformed;
    }
}
