//! `edgefusion chart`: a PNG line chart from a tab-separated table, for scripts that measure
//! curves (`scripts/quant-vs-llamacpp.sh` draws ΔPPL against bits per weight with it).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::plot;

/// Draw series of (x, y) points from a TSV file as a PNG line chart.
///
/// Each non-empty line of the file is `series<TAB>label<TAB>x<TAB>y`; lines starting with
/// `#` are comments. Every series becomes one line through its points in order of x, each
/// point marked and labelled.
#[derive(Args, Debug)]
#[command(after_help = "Example:\n  \
    printf 'efq\\t3.1\\t3.1\\t10.6\\nefq\\t4.13\\t4.13\\t3.0\\n' > curve.tsv\n  \
    edgefusion chart curve.tsv -o curve.png --x-label 'bits per weight' --y-label 'ΔPPL'")]
pub struct ChartArgs {
    /// The table: series, label, x, y per line, tab-separated.
    pub data: PathBuf,
    /// The PNG to write (replaced atomically).
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    #[arg(long, default_value = "")]
    pub title: String,
    #[arg(long, default_value = "x")]
    pub x_label: String,
    #[arg(long, default_value = "y")]
    pub y_label: String,
    /// Draw y on a logarithmic axis (every y must be positive).
    #[arg(long)]
    pub log_y: bool,
}

/// One series: its name and labelled points.
pub type Series = (String, Vec<(f64, f64, String)>);

/// Reads the table; errors name the file, the line and what is wrong.
pub fn read_table(path: &Path) -> Result<Vec<Series>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut series: Vec<Series> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        let at = || format!("{} line {}", path.display(), i + 1);
        if fields.len() != 4 {
            bail!(
                "{}: {} tab-separated fields; a line is series, label, x, y",
                at(),
                fields.len()
            );
        }
        let number = |what: &str, s: &str| -> Result<f64> {
            match s.trim().parse::<f64>() {
                Ok(v) if v.is_finite() => Ok(v),
                _ => bail!("{}: {what} {s:?} is not a finite number", at()),
            }
        };
        let (x, y) = (number("x", fields[2])?, number("y", fields[3])?);
        let point = (x, y, fields[1].to_string());
        match series.iter_mut().find(|(name, _)| name == fields[0]) {
            Some((_, points)) => points.push(point),
            None => series.push((fields[0].to_string(), vec![point])),
        }
    }
    if series.is_empty() {
        bail!(
            "{}: no points (lines are series, label, x, y)",
            path.display()
        );
    }
    for (_, points) in &mut series {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    Ok(series)
}

pub fn run(args: ChartArgs) -> Result<()> {
    plot::check_png_path(&args.output)?;
    let series = read_table(&args.data)?;
    if args.log_y {
        if let Some((name, p)) = series
            .iter()
            .flat_map(|(n, ps)| ps.iter().map(move |p| (n, p)))
            .find(|(_, p)| p.1 <= 0.0)
        {
            bail!(
                "{}: --log-y needs positive y; series {name:?} point {:?} has {}",
                args.data.display(),
                p.2,
                p.1
            );
        }
    }
    plot::line_chart(
        &series,
        &args.title,
        &args.x_label,
        &args.y_label,
        args.log_y,
        &args.output,
    )?;
    println!("wrote {}", args.output.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_group_series_and_refuse_bad_lines() {
        let dir = std::env::temp_dir().join(format!("edgefusion-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.tsv");
        std::fs::write(
            &path,
            "# c\nefq\t3.1\t3.1\t10.6\nllama\tQ4\t4.5\t1.9\nefq\t2\t2.0\t30\n",
        )
        .unwrap();
        let s = read_table(&path).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].0, "efq");
        assert_eq!(s[0].1[0].0, 2.0, "sorted by x");
        for (bad, why) in [
            ("efq\t3.1\t3.1\n", "3 tab-separated fields"),
            ("efq\t3.1\tx\t1\n", "x \"x\""),
            ("efq\t3.1\t1\tinf\n", "not a finite number"),
            ("\n# only\n", "no points"),
        ] {
            std::fs::write(&path, bad).unwrap();
            let e = read_table(&path).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("t.tsv"), "{bad:?}: {e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
