//! The last hour of one shard, per minute, as bars of a server-rendered SVG
//! (the template draws the rects; this computes their geometry): completed
//! jobs in one colour with failed ones stacked on top.

/// Minutes the chart covers.
pub const MINUTES: usize = 60;

/// Chart size in SVG units.
const WIDTH: f64 = 180.0;
const HEIGHT: f64 = 40.0;

/// One minute's bar.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    /// Left edge.
    pub x: String,
    /// Width.
    pub w: String,
    /// Top of the completed part.
    pub done_y: String,
    /// Height of the completed part.
    pub done_h: String,
    /// Top of the failed part (above the completed one).
    pub failed_y: String,
    /// Height of the failed part.
    pub failed_h: String,
    /// Tooltip: minute and counts.
    pub label: String,
}

/// A chart ready to draw.
#[derive(Debug, Clone)]
pub struct Chart {
    /// Width in SVG units.
    pub width: String,
    /// Height in SVG units.
    pub height: String,
    /// One bar per minute that had any finished job, oldest left.
    pub bars: Vec<Bar>,
    /// The busiest minute's total, the chart's scale.
    pub peak: i64,
}

/// The chart of `minutes`: `(minutes ago, completed, failed)` rows, any
/// order; minutes outside the last hour are ignored.
pub fn last_hour(minutes: &[(i32, i64, i64)]) -> Chart {
    let mut done = [0i64; MINUTES];
    let mut failed = [0i64; MINUTES];
    for &(ago, d, f) in minutes {
        if let Ok(i) = usize::try_from(ago) {
            if i < MINUTES {
                done[MINUTES - 1 - i] += d;
                failed[MINUTES - 1 - i] += f;
            }
        }
    }
    let peak = (0..MINUTES).map(|i| done[i] + failed[i]).max().unwrap_or(0);
    let slot = WIDTH / MINUTES as f64;
    let scale = if peak > 0 { HEIGHT / peak as f64 } else { 0.0 };
    let bars = (0..MINUTES)
        .filter(|&i| done[i] + failed[i] > 0)
        .map(|i| {
            let done_h = done[i] as f64 * scale;
            let failed_h = failed[i] as f64 * scale;
            Bar {
                x: format!("{:.1}", i as f64 * slot),
                w: format!("{:.1}", slot * 0.8),
                done_y: format!("{:.1}", HEIGHT - done_h),
                done_h: format!("{done_h:.1}"),
                failed_y: format!("{:.1}", HEIGHT - done_h - failed_h),
                failed_h: format!("{failed_h:.1}"),
                label: format!(
                    "{} min ago: {} completed, {} failed",
                    MINUTES - 1 - i,
                    done[i],
                    failed[i]
                ),
            }
        })
        .collect();
    Chart {
        width: format!("{WIDTH:.0}"),
        height: format!("{HEIGHT:.0}"),
        bars,
        peak,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_scale_to_the_busiest_minute() {
        let chart = last_hour(&[(0, 30, 10), (59, 10, 0), (60, 999, 999), (-1, 5, 5)]);
        assert_eq!(chart.peak, 40);
        assert_eq!(chart.bars.len(), 2);
        // The oldest minute is on the left, the current one on the right.
        assert_eq!(chart.bars[0].x, "0.0");
        assert_eq!(chart.bars[1].x, "177.0");
        assert_eq!(chart.bars[0].done_h, "10.0");
        assert_eq!(chart.bars[1].done_h, "30.0");
        assert_eq!(chart.bars[1].failed_h, "10.0");
        assert_eq!(chart.bars[1].failed_y, "0.0");
    }

    #[test]
    fn an_idle_hour_has_no_bars() {
        let chart = last_hour(&[]);
        assert_eq!(chart.peak, 0);
        assert!(chart.bars.is_empty());
    }
}
