//! PNG line charts of a run's `metrics.jsonl`, written beside its checkpoints: one chart per
//! curve (loss, reward, KL, …) with the step on the x axis. Drawn on a plain pixel buffer with
//! a built-in 5×7 font, encoded by the `png` crate, so no font files or system libraries are
//! needed.

use std::path::{Path, PathBuf};

use serde_json::Value;

const W: usize = 640;
const H: usize = 360;
const LEFT: usize = 70;
const RIGHT: usize = 20;
const TOP: usize = 30;
const BOTTOM: usize = 40;

/// 5×7 glyphs, one byte per row (low five bits, leftmost pixel = bit 4).
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '_' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        '/' => [0x01, 0x01, 0x02, 0x04, 0x08, 0x10, 0x10],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        _ => [0; 7],
    }
}

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Canvas {
            px: vec![255; W * H * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, rgb: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&rgb);
        }
    }

    /// Bresenham, two pixels thick.
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), rgb: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, rgb);
            self.set(x, y + 1, rgb);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn text(&mut self, x: i64, y: i64, s: &str, rgb: [u8; 3]) {
        for (i, c) in s.chars().enumerate() {
            let g = glyph(c);
            for (row, bits) in g.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        self.set(x + i as i64 * 6 + col, y + row as i64, rgb);
                    }
                }
            }
        }
    }

    fn save(&self, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
        let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), W as u32, H as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header()?;
        writer.write_image_data(&self.px)?;
        Ok(())
    }
}

fn label(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e4 || v.abs() < 1e-2) {
        format!("{v:.1e}")
    } else {
        format!("{v:.2}")
    }
}

/// Draws `points` (x, y) as a chart titled `title`.
fn chart(
    title: &str,
    x_name: &str,
    points: &[(f64, f64)],
    path: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut c = Canvas::new();
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let (mut x0, mut x1) = (f64::INFINITY, f64::NEG_INFINITY);
    let (mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        let pad = y0.abs().max(1.0) * 0.05;
        y0 -= pad;
        y1 += pad;
    }
    let to_px = |x: f64, y: f64| {
        (
            LEFT as i64 + ((x - x0) / (x1 - x0) * pw).round() as i64,
            (TOP as f64 + ph - (y - y0) / (y1 - y0) * ph).round() as i64,
        )
    };
    let (grey, black, blue) = ([200, 200, 200], [0, 0, 0], [31, 90, 180]);
    for i in 0..=4 {
        let y = y0 + (y1 - y0) * i as f64 / 4.0;
        let (_, py) = to_px(x0, y);
        c.line((LEFT as i64, py), ((W - RIGHT) as i64, py), grey);
        let l = label(y);
        c.text(LEFT as i64 - 8 - 6 * l.len() as i64, py - 3, &l, black);
    }
    for i in 0..=4 {
        let x = x0 + (x1 - x0) * i as f64 / 4.0;
        let (px, _) = to_px(x, y0);
        let l = label(x);
        c.text(px - 3 * l.len() as i64, (H - BOTTOM + 8) as i64, &l, black);
    }
    c.line(
        (LEFT as i64, TOP as i64),
        (LEFT as i64, (H - BOTTOM) as i64),
        black,
    );
    c.line(
        (LEFT as i64, (H - BOTTOM) as i64),
        ((W - RIGHT) as i64, (H - BOTTOM) as i64),
        black,
    );
    for w in points.windows(2) {
        c.line(to_px(w[0].0, w[0].1), to_px(w[1].0, w[1].1), blue);
    }
    if points.len() == 1 {
        let (px, py) = to_px(points[0].0, points[0].1);
        c.line((px - 2, py), (px + 2, py), blue);
    }
    c.text(LEFT as i64, 10, title, black);
    c.text(
        (W / 2) as i64 - 3 * x_name.len() as i64,
        (H - 14) as i64,
        x_name,
        black,
    );
    c.save(path)
}

/// Writes one PNG per curve found in `out/metrics.jsonl` (`loss`, `reward_mean`,
/// `monitor_score`, `kl`, `accuracy` of a supervised run's micro-batches is left out) and
/// returns their paths. Lines that are not JSON are skipped.
pub fn write_plots(out: &Path) -> Result<Vec<PathBuf>, Box<dyn std::error::Error>> {
    let path = out.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let mut written = Vec::new();
    let curves = [
        ("loss", "LOSS"),
        ("reward_mean", "REWARD (MEAN)"),
        ("monitor_score", "MONITOR SCORE (LABELLER)"),
        ("kl", "KL TO REFERENCE"),
        ("value_loss", "VALUE LOSS"),
        ("clip_fraction", "CLIP FRACTION"),
    ];
    for (key, title) in curves {
        let points: Vec<(f64, f64)> = lines
            .iter()
            .enumerate()
            .filter_map(|(i, l)| {
                let x = l["iteration"]
                    .as_f64()
                    .or(l["step"].as_f64())
                    .unwrap_or(i as f64 + 1.0);
                l[key].as_f64().filter(|y| y.is_finite()).map(|y| (x, y))
            })
            .collect();
        if points.is_empty() {
            continue;
        }
        let x_name = if lines.iter().any(|l| l["iteration"].is_number()) {
            "ITERATION"
        } else {
            "STEP"
        };
        let file = out.join(format!("{key}.png"));
        chart(title, x_name, &points, &file)?;
        written.push(file);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_are_valid_pngs_of_the_right_size() {
        let dir = tempfile::tempdir().unwrap();
        let lines: Vec<String> = (1..=5)
            .map(|i| {
                format!(
                    "{{\"step\": {i}, \"loss\": {}, \"kl\": 0.{i}}}",
                    3.0 / i as f64
                )
            })
            .collect();
        std::fs::write(dir.path().join("metrics.jsonl"), lines.join("\n")).unwrap();
        let files = write_plots(dir.path()).unwrap();
        assert_eq!(files.len(), 2);
        for f in files {
            let decoder =
                png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&f).unwrap()));
            let reader = decoder.read_info().unwrap();
            assert_eq!(
                (reader.info().width, reader.info().height),
                (W as u32, H as u32)
            );
        }
        assert!(write_plots(&dir.path().join("missing")).is_err());
    }
}
