//! The run's journal: every fault injected (with its time, so the checker can tell whether a
//! duplicate email had a crash to explain it) and the phase it fell in, written to
//! `faults.jsonl` as it happens.

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fault {
    /// Unix time, milliseconds.
    pub at_ms: u64,
    pub phase: String,
    pub kind: String,
    pub detail: Value,
}

impl Fault {
    /// A fault after which the same email may go out twice: the process that had it in hand
    /// (or the database that was to record its status) died without a word.
    pub fn is_crash(&self) -> bool {
        matches!(
            self.kind.as_str(),
            "engine_sigkill" | "postgres_stop_immediate"
        )
    }
}

#[derive(Clone)]
pub struct Journal(Arc<Mutex<Inner>>);

struct Inner {
    file: std::io::BufWriter<std::fs::File>,
    phase: String,
}

impl Journal {
    pub fn create(path: &std::path::Path) -> anyhow::Result<Self> {
        Ok(Self(Arc::new(Mutex::new(Inner {
            file: std::io::BufWriter::new(std::fs::File::create(path)?),
            phase: "start".into(),
        }))))
    }

    pub fn set_phase(&self, phase: &str) {
        self.0.lock().unwrap().phase = phase.to_owned();
        self.fault("phase", serde_json::json!({ "name": phase }));
    }

    pub fn phase(&self) -> String {
        self.0.lock().unwrap().phase.clone()
    }

    pub fn fault(&self, kind: &str, detail: Value) {
        let mut inner = self.0.lock().unwrap();
        let fault = Fault {
            at_ms: now_ms(),
            phase: inner.phase.clone(),
            kind: kind.to_owned(),
            detail,
        };
        eprintln!("[chaos] {} {} {}", fault.phase, fault.kind, fault.detail);
        let line = serde_json::to_string(&fault).expect("a fault serializes");
        let _ = writeln!(inner.file, "{line}");
        let _ = inner.file.flush();
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}
