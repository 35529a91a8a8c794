//! The one results format every benchmark writes with `--results FILE` (the Python ones too),
//! which `sov-bench report` turns into `benchmarks/REPORT.md` and its PNG plots.
//!
//! A file holds one [`BenchResult`]: a title, the command that reproduces it, a paragraph on
//! what runs on each side, tables (cells are strings, already formatted), line plots, the
//! headline rows (sov against one peer, with the ratio) and notes.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// `println!` that also appends the line to a `String` (the Markdown a results file is parsed
/// from, see [`tables_from_markdown`]).
#[macro_export]
macro_rules! tee {
    ($md:expr, $($t:tt)*) => {{
        let line = format!($($t)*);
        println!("{line}");
        $md.push_str(&line);
        $md.push('\n');
    }};
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BenchResult {
    /// Short name; also the file's stem and the order key of the report.
    pub bench: String,
    pub title: String,
    /// The exact command that produced the file.
    pub command: String,
    /// Markdown: what runs on each side of the comparison.
    #[serde(default)]
    pub setup: String,
    #[serde(default)]
    pub tables: Vec<Table>,
    #[serde(default)]
    pub plots: Vec<Plot>,
    #[serde(default)]
    pub headline: Vec<Headline>,
    #[serde(default)]
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Table {
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Plot {
    /// File stem of the PNG.
    pub name: String,
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    #[serde(default)]
    pub log_x: bool,
    #[serde(default)]
    pub log_y: bool,
    pub series: Vec<Series>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Series {
    pub name: String,
    /// (x, y) points, in x order.
    pub points: Vec<(f64, f64)>,
}

/// One line of the report's headline table: a sov figure next to a peer's, measured in the
/// same run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Headline {
    pub what: String,
    pub sov: String,
    pub peer_name: String,
    pub peer: String,
    /// sov over peer, oriented so that above 1 means sov is better.
    pub ratio: f64,
}

impl Table {
    pub fn new(title: impl Into<String>, columns: &[&str]) -> Table {
        Table {
            title: title.into(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as Markdown; numeric-looking columns are right-aligned.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        if !self.title.is_empty() {
            out.push_str(&format!("{}\n\n", self.title));
        }
        out.push_str(&format!("| {} |\n", self.columns.join(" | ")));
        let align: Vec<&str> = (0..self.columns.len())
            .map(|i| {
                // Numbers, "-" and "12.5 / 30" read as numbers; "4k randread qd1" does not.
                let numeric = !self.rows.is_empty()
                    && self.rows.iter().all(|r| {
                        r.get(i).is_some_and(|c| {
                            let first = c.split_whitespace().next().unwrap_or("");
                            first == "-" || first.parse::<f64>().is_ok() || size_like(first)
                        })
                    });
                if numeric { "---:" } else { "---" }
            })
            .collect();
        out.push_str(&format!("|{}|\n", align.join("|")));
        for r in &self.rows {
            let cells: Vec<String> = (0..self.columns.len())
                .map(|i| r.get(i).cloned().unwrap_or_default().replace('|', "\\|"))
                .collect();
            out.push_str(&format!("| {} |\n", cells.join(" | ")));
        }
        out
    }
}

impl Table {
    /// The index of the column named `name`.
    pub fn col(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == name)
    }

    /// The number a cell starts with (`"12.5 MiB/s"` → 12.5); NaN if none.
    pub fn value(&self, row: usize, col: &str) -> f64 {
        self.col(col)
            .and_then(|c| self.rows.get(row)?.get(c))
            .and_then(|cell| {
                let t = cell.trim();
                let end = t
                    .find(|ch: char| !(ch.is_ascii_digit() || ch == '.' || ch == '-'))
                    .unwrap_or(t.len());
                t[..end].parse().ok()
            })
            .unwrap_or(f64::NAN)
    }

    /// A series of (x column, y column) over the rows that `keep` accepts.
    pub fn series(
        &self,
        name: &str,
        x_col: &str,
        y_col: &str,
        keep: impl Fn(&[String]) -> bool,
    ) -> Series {
        Series {
            name: name.into(),
            points: (0..self.rows.len())
                .filter(|&r| keep(&self.rows[r]))
                .map(|r| (self.value(r, x_col), self.value(r, y_col)))
                .collect(),
        }
    }

    /// A headline line from one row: `sov_col` against `peer_col`, higher is better.
    pub fn headline(
        &self,
        row: usize,
        what: &str,
        sov_col: &str,
        peer_col: &str,
        peer_name: &str,
        unit: &str,
    ) -> Headline {
        let (a, b) = (self.value(row, sov_col), self.value(row, peer_col));
        Headline {
            what: what.into(),
            sov: format!("{} {unit}", num(a)),
            peer_name: peer_name.into(),
            peer: format!("{} {unit}", num(b)),
            ratio: ratio(a, b),
        }
    }
}

/// The Markdown tables in `md` (runs of lines starting with `|`, the second one the
/// alignment row), each titled by the text line just above it, if any.
pub fn tables_from_markdown(md: &str) -> Vec<Table> {
    let lines: Vec<&str> = md.lines().map(str::trim).collect();
    let split = |l: &str| -> Vec<String> {
        l.trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect()
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].starts_with('|')
            && lines
                .get(i + 1)
                .is_some_and(|l| l.starts_with("|-") || l.starts_with("|:"))
        {
            let title = (0..i)
                .rev()
                .map(|j| lines[j])
                .find(|l| !l.is_empty())
                .filter(|l| !l.starts_with('|'))
                .unwrap_or("")
                .to_string();
            let mut t = Table {
                title,
                columns: split(lines[i]),
                rows: Vec::new(),
            };
            i += 2;
            while i < lines.len() && lines[i].starts_with('|') {
                t.rows.push(split(lines[i]));
                i += 1;
            }
            out.push(t);
        } else {
            i += 1;
        }
    }
    out
}

/// `4KiB`, `256MiB`: a size, aligned like a number.
fn size_like(s: &str) -> bool {
    ["KiB", "MiB", "GiB", "B"].iter().any(|unit| {
        s.strip_suffix(unit)
            .is_some_and(|d| !d.is_empty() && d.parse::<u64>().is_ok())
    })
}

impl Series {
    pub fn new(name: impl Into<String>) -> Series {
        Series {
            name: name.into(),
            points: Vec::new(),
        }
    }
}

impl BenchResult {
    /// Writes the result as pretty JSON to `path` (folders created).
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(path, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    pub fn read(path: &Path) -> anyhow::Result<BenchResult> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
    }

    /// Writes to `path` when one was given.
    pub fn write_to(&self, path: Option<&Path>) -> anyhow::Result<()> {
        match path {
            Some(p) => self.write(p),
            None => Ok(()),
        }
    }
}

/// The command line this process was started with, as one shell-like string.
pub fn this_command() -> String {
    command_string(std::env::args())
}

/// Joins a command line for display; the value of any `--*secret*` flag becomes `***`, so
/// keys never reach a results file or the report.
fn command_string(args: impl IntoIterator<Item = String>) -> String {
    let mut args = args.into_iter();
    let exe = args.next().unwrap_or_default();
    // Show the binary relative to the working folder when it lies under it.
    let exe = std::env::current_dir()
        .ok()
        .and_then(|cwd| {
            Path::new(&exe)
                .strip_prefix(&cwd)
                .ok()
                .map(|p| p.display().to_string())
        })
        .unwrap_or(exe);
    let mut hide_next = false;
    std::iter::once(exe)
        .chain(args)
        .map(|a| {
            let secret_flag = a.starts_with("--") && a.contains("secret");
            let a = if std::mem::replace(&mut hide_next, false) {
                "***".to_string()
            } else if secret_flag && a.contains('=') {
                format!("{}=***", a.split('=').next().unwrap_or_default())
            } else {
                hide_next = secret_flag;
                a
            };
            if a.is_empty() || a.contains([' ', '"', '\'', '$']) {
                format!("'{}'", a.replace('\'', "'\\''"))
            } else {
                a
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `1234.5` → `1235`, `12.345` → `12.3`, `0.1234` → `0.123`: three significant-ish figures.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if a >= 100.0 || (a >= 1.0 && v.fract() == 0.0) {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// A ratio as a table cell: two decimals, `-` when there is none.
pub fn ratio_cell(r: f64) -> String {
    if r.is_finite() {
        format!("{r:.2}")
    } else {
        "-".into()
    }
}

/// A ratio; NaN unless both sides are finite and the divisor positive.
pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 && a.is_finite() && b.is_finite() {
        a / b
    } else {
        f64::NAN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_numbers_right_and_escape_pipes() {
        let mut t = Table::new("", &["case", "ops/s", "ratio"]);
        t.row(vec!["a|b".into(), "12".into(), "0.50".into()]);
        t.row(vec!["c".into(), "-".into(), "1.25".into()]);
        let md = t.markdown();
        assert!(
            md.starts_with("| case | ops/s | ratio |\n|---|---:|---:|\n"),
            "{md}"
        );
        let mut w = Table::new("", &["workload", "size", "p50 / p99"]);
        w.row(vec![
            "4k randread qd1".into(),
            "4KiB".into(),
            "7.5 / 16".into(),
        ]);
        assert!(w.markdown().contains("|---|---:|---:|"), "{}", w.markdown());
        assert!(md.contains("| a\\|b | 12 | 0.50 |"), "{md}");
    }

    #[test]
    fn results_round_trip_through_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/x.json");
        let r = BenchResult {
            bench: "x".into(),
            title: "X".into(),
            command: "sov-bench x".into(),
            plots: vec![Plot {
                name: "p".into(),
                series: vec![Series {
                    name: "sov".into(),
                    points: vec![(1.0, 2.0)],
                }],
                ..Default::default()
            }],
            headline: vec![Headline {
                what: "w".into(),
                ratio: 0.5,
                ..Default::default()
            }],
            ..Default::default()
        };
        r.write(&path).unwrap();
        let back = BenchResult::read(&path).unwrap();
        assert_eq!(back.plots[0].series[0].points, vec![(1.0, 2.0)]);
        assert_eq!(back.headline[0].ratio, 0.5);
        // A file from the Python benchmarks may leave out the optional parts.
        std::fs::write(&path, r#"{"bench":"b","title":"B","command":"c"}"#).unwrap();
        assert!(BenchResult::read(&path).unwrap().tables.is_empty());
    }

    #[test]
    fn markdown_tables_parse_back() {
        let md = "intro\n\nWrites by clients\n\n| clients | metad writes/s | etcd writes/s |\n|---:|---:|---:|\n| 1 | 570 | 916 |\n| 16 | 2675.5 | 3179 |\n\nerrors: none\n";
        let t = &tables_from_markdown(md)[0];
        assert_eq!(t.title, "Writes by clients");
        assert_eq!(t.rows.len(), 2);
        assert_eq!(t.value(1, "metad writes/s"), 2675.5);
        assert!(t.value(0, "nope").is_nan());
        let s = t.series("metad", "clients", "metad writes/s", |_| true);
        assert_eq!(s.points, vec![(1.0, 570.0), (16.0, 2675.5)]);
        let h = t.headline(
            1,
            "w",
            "metad writes/s",
            "etcd writes/s",
            "etcd",
            "writes/s",
        );
        assert!((h.ratio - 2675.5 / 3179.0).abs() < 1e-12);
        assert_eq!(h.peer, "3179 writes/s");
    }

    #[test]
    fn secrets_stay_out_of_command_lines() {
        let cmd = command_string(
            [
                "sov-bench",
                "s3",
                "--compare-secret-key",
                "hunter2",
                "--sov-secret-key=abc",
                "--x",
                "a b",
            ]
            .map(String::from),
        );
        assert_eq!(
            cmd,
            "sov-bench s3 --compare-secret-key *** --sov-secret-key=*** --x 'a b'"
        );
        assert_eq!(ratio_cell(f64::NAN), "-");
        assert_eq!(ratio_cell(0.5), "0.50");
    }

    #[test]
    fn numbers_keep_three_figures() {
        assert_eq!(num(1234.4), "1234");
        assert_eq!(num(12.345), "12.3");
        assert_eq!(num(1.2345), "1.23");
        assert_eq!(num(0.12345), "0.123");
        assert_eq!(num(10.0), "10");
        assert_eq!(num(f64::NAN), "-");
        assert!(ratio(1.0, 0.0).is_nan());
    }
}
