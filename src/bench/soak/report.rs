//! The soak's report: requests by outcome per phase and in total, what happened to the requests in
//! flight at each fault's signal, the memory and end of every process; a table and JSON.
//!
//! A request belongs to the phase in which it *ended* (a request cut by a fault counts in that
//! fault's phase). A phase begins when its fault begins (for a rolling replacement: when the
//! replacement worker is started, before the SIGTERM) and lasts until the next one begins. A
//! request is "in flight at the signal" of a fault when it was sent before the signal and ended
//! after it.

use std::collections::BTreeMap;

use serde::Serialize;

use super::load::{Outcome, Record};
use super::procs::ProcRecord;

/// How many failure and loss descriptions the report keeps.
const EXAMPLES_KEPT: usize = 30;

/// Requests by outcome.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Tally {
    pub sent: usize,
    pub completed: usize,
    /// Failed with a proper error (an OpenAI error status or an SSE error event then `[DONE]`).
    pub failed: usize,
    pub failed_by_kind: BTreeMap<String, usize>,
    /// Connection refused while the head was down.
    pub refused: usize,
    /// Connection broken because the head was killed during the request.
    pub cut: usize,
    /// Everything else: must be 0.
    pub lost: usize,
}

impl Tally {
    pub fn add(&mut self, outcome: &Outcome) {
        self.sent += 1;
        match outcome {
            Outcome::Completed => self.completed += 1,
            Outcome::Failed { kind, .. } => {
                self.failed += 1;
                *self.failed_by_kind.entry(kind.clone()).or_default() += 1;
            }
            Outcome::Refused => self.refused += 1,
            Outcome::Cut(_) => self.cut += 1,
            Outcome::Lost(_) => self.lost += 1,
        }
    }

    /// Requests that did not complete.
    pub fn not_completed(&self) -> usize {
        self.sent - self.completed
    }
}

/// The kinds of fault the schedule injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// SIGKILL a worker, then start a new one.
    WorkerKill,
    /// Start a new worker, then SIGTERM an old one (graceful).
    RollingReplacement,
    /// SIGKILL the head, restart it on the same state directory and ports.
    HeadRestart,
}

impl FaultKind {
    pub fn parse(s: &str) -> Result<FaultKind, String> {
        match s.trim() {
            "kill" | "worker-kill" => Ok(FaultKind::WorkerKill),
            "roll" | "rolling" => Ok(FaultKind::RollingReplacement),
            "head" | "head-restart" => Ok(FaultKind::HeadRestart),
            other => Err(format!("unknown fault `{other}`: expected kill, roll or head")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::WorkerKill => "worker_kill",
            FaultKind::RollingReplacement => "rolling_replacement",
            FaultKind::HeadRestart => "head_restart",
        }
    }
}

/// One injected fault, as the schedule saw it.
#[derive(Clone, Debug, Serialize)]
pub struct FaultReport {
    pub kind: FaultKind,
    pub phase: usize,
    /// When the SIGKILL / SIGTERM was sent, seconds after the soak began.
    pub signal_s: f64,
    pub victim: String,
    /// The process started in its place.
    pub replacement: String,
    /// Seconds from the signal until every replica ran again on live workers (`None`: not
    /// within the recovery timeout).
    pub recovered_after_s: Option<f64>,
    /// Requests sent before the signal that ended after it.
    pub in_flight_at_signal: Tally,
}

/// One phase of the run.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseReport {
    pub name: String,
    pub start_s: f64,
    pub end_s: f64,
    #[serde(flatten)]
    pub tally: Tally,
}

/// What the soak was asked to do.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub model: String,
    pub workers: usize,
    pub replicas: usize,
    pub concurrency: usize,
    pub duration_s: f64,
    pub max_tokens: u32,
    pub request_timeout_s: f64,
    pub faults: Vec<FaultKind>,
}

/// The whole run.
#[derive(Clone, Debug, Serialize)]
pub struct SoakReport {
    pub settings: Settings,
    pub elapsed_s: f64,
    pub totals: Tally,
    pub phases: Vec<PhaseReport>,
    pub faults: Vec<FaultReport>,
    /// Requests of rolling replacements that did not complete: in flight at a rolling SIGTERM, or
    /// ended in a rolling phase.
    pub rolling_not_completed: usize,
    /// Requests moved to another replica mid-stream (request migration), by reason, summed over
    /// the heads of the run (each head's `lumen:request_migrations_total` before it was killed
    /// or stopped).
    pub migrations: BTreeMap<String, u64>,
    pub processes: Vec<ProcRecord>,
    /// Descriptions of failed and lost requests (phase, kind, message), the first few.
    pub examples: Vec<String>,
    /// Why the run failed; empty when it passed.
    pub problems: Vec<String>,
    pub ok: bool,
    pub work_dir: String,
}

/// Requests of rolling replacements that did not complete: those in flight at a rolling SIGTERM,
/// and the others that ended in a rolling phase.
fn rolling_not_completed(faults: &[FaultReport], records: &[Record]) -> usize {
    let mut count = 0;
    for fault in faults.iter().filter(|f| f.kind == FaultKind::RollingReplacement) {
        count += fault.in_flight_at_signal.not_completed();
        count += records
            .iter()
            .filter(|r| r.phase == fault.phase)
            .filter(|r| !(r.sent_s < fault.signal_s && r.ended_s >= fault.signal_s))
            .filter(|r| r.outcome != Outcome::Completed)
            .count();
    }
    count
}

impl SoakReport {
    /// Tallies `records` into `phases` (name and start each; the last ends at `elapsed_s`).
    pub fn build(
        settings: Settings,
        elapsed_s: f64,
        phases: &[(String, f64)],
        mut faults: Vec<FaultReport>,
        records: &[Record],
        processes: Vec<ProcRecord>,
        work_dir: String,
    ) -> SoakReport {
        let mut phase_reports: Vec<PhaseReport> = phases
            .iter()
            .enumerate()
            .map(|(i, (name, start_s))| PhaseReport {
                name: name.clone(),
                start_s: *start_s,
                end_s: phases.get(i + 1).map_or(elapsed_s, |p| p.1),
                tally: Tally::default(),
            })
            .collect();
        let mut totals = Tally::default();
        let mut examples = Vec::new();
        for r in records {
            totals.add(&r.outcome);
            if let Some(p) = phase_reports.get_mut(r.phase) {
                p.tally.add(&r.outcome);
            }
            for fault in faults.iter_mut().filter(|f| r.sent_s < f.signal_s && r.ended_s >= f.signal_s) {
                fault.in_flight_at_signal.add(&r.outcome);
            }
            let described = match &r.outcome {
                Outcome::Failed { kind, message } => Some(format!("failed ({kind}): {message}")),
                Outcome::Lost(why) => Some(format!("LOST: {why}")),
                Outcome::Cut(why) => Some(format!("cut by the head's death: {why}")),
                Outcome::Completed | Outcome::Refused => None,
            };
            if let Some(text) = described
                && examples.len() < EXAMPLES_KEPT
            {
                let phase = phases.get(r.phase).map_or("?", |p| p.0.as_str());
                examples.push(format!("[{phase}, {}, sent at {:.1} s] {text}", r.kind, r.sent_s));
            }
        }
        let rolling_not_completed = rolling_not_completed(&faults, records);
        let mut problems = Vec::new();
        if totals.lost > 0 {
            problems.push(format!("{} requests lost (no completion and no proper error)", totals.lost));
        }
        if totals.completed == 0 {
            problems.push("no request completed".into());
        }
        if rolling_not_completed > 0 {
            problems.push(format!("{rolling_not_completed} requests of rolling replacements did not complete"));
        }
        for p in processes.iter().filter(|p| p.end.is_some() && !p.clean) {
            problems.push(format!("{} ended badly: {}", p.name, p.end.as_deref().unwrap_or_default()));
        }
        for f in faults.iter().filter(|f| f.recovered_after_s.is_none()) {
            problems.push(format!("the cluster did not recover after {} of {}", f.kind.name(), f.victim));
        }
        SoakReport {
            settings,
            elapsed_s,
            totals,
            phases: phase_reports,
            faults,
            rolling_not_completed,
            migrations: BTreeMap::new(),
            processes,
            examples,
            ok: problems.is_empty(),
            problems,
            work_dir,
        }
    }

    /// A human-readable summary.
    pub fn table(&self) -> String {
        let s = &self.settings;
        let mut t = format!(
            "============ lumen bench soak: {} workers, {} replicas, concurrency {}, {:.0} s ============\n",
            s.workers, s.replicas, s.concurrency, self.elapsed_s
        );
        t.push_str(&format!(
            "{:<24}{:>13}{:>7}{:>10}{:>8}{:>9}{:>6}{:>6}\n",
            "phase", "seconds", "sent", "completed", "failed", "refused", "cut", "lost"
        ));
        let row = |t: &mut String, name: &str, span: String, x: &Tally| {
            t.push_str(&format!(
                "{name:<24}{span:>13}{:>7}{:>10}{:>8}{:>9}{:>6}{:>6}\n",
                x.sent, x.completed, x.failed, x.refused, x.cut, x.lost
            ));
        };
        for p in &self.phases {
            row(&mut t, &p.name, format!("{:.0}-{:.0}", p.start_s, p.end_s), &p.tally);
        }
        row(&mut t, "total", format!("0-{:.0}", self.elapsed_s), &self.totals);
        if !self.totals.failed_by_kind.is_empty() {
            let kinds: Vec<String> = self.totals.failed_by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect();
            t.push_str(&format!("failed by kind: {}\n", kinds.join(", ")));
        }
        t.push_str(&format!(
            "\n{:<24}{:>9}{:>11}{:>10}{:>8}{:>6}{:>6}{:>13}\n",
            "fault (victim)", "signal s", "in flight", "completed", "failed", "cut", "lost", "recovered s"
        ));
        for f in &self.faults {
            let x = &f.in_flight_at_signal;
            let recovered = f.recovered_after_s.map_or_else(|| "no".to_string(), |r| format!("{r:.1}"));
            t.push_str(&format!(
                "{:<24}{:>9.1}{:>11}{:>10}{:>8}{:>6}{:>6}{recovered:>13}\n",
                format!("{} ({})", f.kind.name(), f.victim),
                f.signal_s,
                x.sent,
                x.completed,
                x.failed,
                x.cut,
                x.lost
            ));
        }
        t.push_str(&format!("rolling replacements: {} requests not completed\n", self.rolling_not_completed));
        let reasons: Vec<String> = self.migrations.iter().map(|(r, n)| format!("{r} {n}")).collect();
        t.push_str(&format!(
            "request migrations: {}{}\n",
            self.migrations.values().sum::<u64>(),
            if reasons.is_empty() { String::new() } else { format!(" ({})", reasons.join(", ")) }
        ));
        t.push_str(&format!(
            "\n{:<8}{:<8}{:>9}{:>24}  {}\n",
            "process", "role", "pid", "RSS MiB start/end/peak", "end"
        ));
        let mib = |kib: u64| kib as f64 / 1024.0;
        for p in &self.processes {
            t.push_str(&format!(
                "{:<8}{:<8}{:>9}{:>24}  {}\n",
                p.name,
                p.role,
                p.pid,
                format!("{:.0} / {:.0} / {:.0}", mib(p.rss_start_kib), mib(p.rss_end_kib), mib(p.rss_peak_kib)),
                p.end.as_deref().unwrap_or("running")
            ));
        }
        t.push_str(&format!("\nresult: {}\n", if self.ok { "ok".to_string() } else { self.problems.join("; ") }));
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(phase: usize, sent_s: f64, ended_s: f64, outcome: Outcome) -> Record {
        Record { kind: "chat", phase, sent_s, ended_s, outcome }
    }

    fn settings() -> Settings {
        Settings {
            model: "m".into(),
            workers: 2,
            replicas: 2,
            concurrency: 2,
            duration_s: 10.0,
            max_tokens: 8,
            request_timeout_s: 30.0,
            faults: vec![FaultKind::RollingReplacement],
        }
    }

    fn roll_fault(signal_s: f64) -> FaultReport {
        FaultReport {
            kind: FaultKind::RollingReplacement,
            phase: 1,
            signal_s,
            victim: "w1".into(),
            replacement: "w3".into(),
            recovered_after_s: Some(1.0),
            in_flight_at_signal: Tally::default(),
        }
    }

    #[test]
    fn requests_count_in_the_phase_they_ended_and_in_flight_at_the_signal() {
        let phases = [("steady".to_string(), 0.0), ("rolling_replacement 1".to_string(), 5.0)];
        let records = [
            record(0, 1.0, 2.0, Outcome::Completed),
            record(1, 5.5, 7.0, Outcome::Completed),
            record(1, 6.5, 8.0, Outcome::Failed { kind: "http_503".into(), message: "x".into() }),
        ];
        let report = SoakReport::build(settings(), 10.0, &phases, vec![roll_fault(6.0)], &records, vec![], "d".into());
        assert_eq!(
            (report.phases[0].tally.sent, report.phases[1].tally.sent, report.phases[1].tally.failed),
            (1, 2, 1)
        );
        assert_eq!(report.phases[0].end_s, 5.0);
        assert_eq!(report.faults[0].in_flight_at_signal.sent, 1);
        assert_eq!(report.rolling_not_completed, 1);
        assert!(!report.ok, "a failure in a rolling phase fails the run");
        assert_eq!(report.totals.failed_by_kind["http_503"], 1);
    }

    #[test]
    fn a_lost_request_fails_the_run_and_refusals_do_not() {
        let phases = [("steady".to_string(), 0.0)];
        let ok = [record(0, 0.0, 1.0, Outcome::Completed), record(0, 1.0, 1.1, Outcome::Refused)];
        assert!(SoakReport::build(settings(), 2.0, &phases, vec![], &ok, vec![], "d".into()).ok);
        let lost = [record(0, 0.0, 1.0, Outcome::Completed), record(0, 1.0, 2.0, Outcome::Lost("cut".into()))];
        let report = SoakReport::build(settings(), 2.0, &phases, vec![], &lost, vec![], "d".into());
        assert!(!report.ok && report.problems[0].contains("lost"), "{:?}", report.problems);
        assert!(report.table().contains("LOST") || report.examples.iter().any(|e| e.contains("LOST")));
    }
}
