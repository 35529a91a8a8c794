//! Results: per-round timings reduced to medians, printed as a Markdown table or as JSON.

use std::time::Duration;

use serde::Serialize;

/// What the rows measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Put,
    Get,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Get => "get",
        }
    }
}

/// One round of one (op, size, concurrency) case.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub sov: Duration,
    pub raw: Duration,
    /// fdatasyncs storaged made (and the baseline repeated); none for reads.
    pub syncs: Option<u64>,
}

/// One line of the result: medians over the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub op: Op,
    pub size_bytes: u64,
    pub size: String,
    pub conc: usize,
    /// Operations per round.
    pub ops: u64,
    pub rounds: usize,
    /// 10^6 bytes per second.
    pub sov_mb_s: f64,
    pub raw_mb_s: f64,
    /// sov_mb_s / raw_mb_s.
    pub ratio: f64,
    pub sov_ops_s: f64,
    pub raw_ops_s: f64,
    /// Median fdatasyncs per round (puts only).
    pub syncs: Option<u64>,
}

impl Row {
    pub fn new(op: Op, size: u64, conc: usize, ops: u64, samples: &[Sample]) -> Row {
        let rate = |d: Duration| ops as f64 / d.as_secs_f64().max(1e-9);
        let sov_ops_s = median(samples.iter().map(|s| rate(s.sov)).collect());
        let raw_ops_s = median(samples.iter().map(|s| rate(s.raw)).collect());
        let syncs = samples
            .iter()
            .map(|s| s.syncs.map(|n| n as f64))
            .collect::<Option<Vec<f64>>>()
            .map(|v| median(v).round() as u64);
        let mb = |ops_s: f64| ops_s * size as f64 / 1e6;
        Row {
            op,
            size_bytes: size,
            size: size_label(size),
            conc,
            ops,
            rounds: samples.len(),
            sov_mb_s: mb(sov_ops_s),
            raw_mb_s: mb(raw_ops_s),
            ratio: sov_ops_s / raw_ops_s,
            sov_ops_s,
            raw_ops_s,
            syncs,
        }
    }
}

/// The median; the mean of the middle two for an even count; NaN when empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// `4MiB`, `1MiB`, `4KiB`, or bytes.
pub fn size_label(size: u64) -> String {
    match size {
        s if s >= 1 << 20 && s % (1 << 20) == 0 => format!("{}MiB", s >> 20),
        s if s >= 1 << 10 && s % (1 << 10) == 0 => format!("{}KiB", s >> 10),
        s => format!("{s}B"),
    }
}

/// Everything printed about a run besides the rows.
#[derive(Debug, Clone, Serialize)]
pub struct Context {
    pub dir: String,
    pub filesystem: String,
    pub io_engine: String,
    pub build: &'static str,
    pub notes: Vec<String>,
    pub command: String,
}

/// The Markdown form: a heading line, the table, the notes, the command.
pub fn markdown(ctx: &Context, rows: &[Row]) -> String {
    let mut out = format!(
        "storaged vs raw disk: {} ({}), io engine {}, {} build, medians of {} round(s)\n\n",
        ctx.dir,
        ctx.filesystem,
        ctx.io_engine,
        ctx.build,
        rows.first().map(|r| r.rounds).unwrap_or(0),
    );
    out.push_str(
        "| op | size | conc | sov MB/s | raw MB/s | ratio | sov ops/s | raw ops/s | syncs |\n",
    );
    out.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.2} | {:.0} | {:.0} | {} |\n",
            r.op.as_str(),
            r.size,
            r.conc,
            r.sov_mb_s,
            r.raw_mb_s,
            r.ratio,
            r.sov_ops_s,
            r.raw_ops_s,
            r.syncs.map_or_else(|| "-".to_string(), |s| s.to_string()),
        ));
    }
    out.push('\n');
    for n in &ctx.notes {
        out.push_str(&format!("- {n}\n"));
    }
    out.push_str(&format!("\nreproduce: {}\n", ctx.command));
    out
}

/// The JSON form: the context fields and `rows`.
pub fn json(ctx: &Context, rows: &[Row]) -> serde_json::Result<String> {
    #[derive(Serialize)]
    struct Out<'a> {
        #[serde(flatten)]
        ctx: &'a Context,
        rows: &'a [Row],
    }
    serde_json::to_string_pretty(&Out { ctx, rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }

    #[test]
    fn size_labels() {
        assert_eq!(size_label(4 << 20), "4MiB");
        assert_eq!(size_label(4096), "4KiB");
        assert_eq!(size_label(1000), "1000B");
    }

    #[test]
    fn a_row_holds_medians_and_the_ratio() {
        let s = |sov_ms, raw_ms| Sample {
            sov: Duration::from_millis(sov_ms),
            raw: Duration::from_millis(raw_ms),
            syncs: Some(sov_ms),
        };
        // 100 ops of 1 MB: 1 s is 100 MB/s.
        let row = Row::new(
            Op::Put,
            1_000_000,
            4,
            100,
            &[s(1000, 500), s(4000, 250), s(2000, 1000)],
        );
        assert!((row.sov_mb_s - 50.0).abs() < 1e-9);
        assert!((row.raw_mb_s - 200.0).abs() < 1e-9);
        assert!((row.ratio - 0.25).abs() < 1e-9);
        assert!((row.sov_ops_s - 50.0).abs() < 1e-9);
        assert_eq!(row.syncs, Some(2000));
        let text = markdown(
            &Context {
                dir: "/d".into(),
                filesystem: "ext4".into(),
                io_engine: "pread".into(),
                build: "debug",
                notes: vec!["a note".into()],
                command: "sov-bench storaged".into(),
            },
            &[row],
        );
        assert!(
            text.contains("| put | 1000000B | 4 | 50.0 | 200.0 | 0.25 | 50 | 200 | 2000 |"),
            "{text}"
        );
        assert!(text.ends_with("reproduce: sov-bench storaged\n"));
    }
}
