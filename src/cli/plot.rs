//! A chart as a list of drawing items, rendered either as an SVG document (text
//! in the viewer's sans-serif font) or as a PNG image: lines and shapes through
//! `tiny-skia` (anti-aliased), text from the 8x8 bitmap font of `font8x8`, so a
//! PNG needs no font file and no system library.

use std::fmt::Write as _;

use font8x8::UnicodeFonts;

/// An RGB colour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Color(pub u8, pub u8, pub u8);

impl Color {
    pub const BLACK: Color = Color(0, 0, 0);

    fn hex(self) -> String {
        format!("#{:02x}{:02x}{:02x}", self.0, self.1, self.2)
    }

    fn skia(self) -> tiny_skia::Color {
        tiny_skia::Color::from_rgba8(self.0, self.1, self.2, 255)
    }
}

/// Where a text's `x` is: at its start, middle or end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Anchor {
    Start,
    Middle,
    End,
}

impl Anchor {
    fn svg(self) -> &'static str {
        match self {
            Anchor::Start => "start",
            Anchor::Middle => "middle",
            Anchor::End => "end",
        }
    }
}

/// A text item. `y` is its baseline; `vertical` turns it a quarter left about
/// (`x`, `y`), to read upwards.
#[derive(Clone, Debug)]
pub struct Text {
    pub x: f64,
    pub y: f64,
    pub text: String,
    pub size: f64,
    pub anchor: Anchor,
    pub color: Color,
    pub bold: bool,
    pub vertical: bool,
}

impl Text {
    /// Plain text of `size` px, black, horizontal.
    pub fn new(x: f64, y: f64, text: impl Into<String>, size: f64, anchor: Anchor) -> Text {
        Text { x, y, text: text.into(), size, anchor, color: Color::BLACK, bold: false, vertical: false }
    }
}

#[derive(Clone, Debug)]
enum Item {
    Polyline { points: Vec<(f64, f64)>, color: Color, width: f64 },
    Rect { x: f64, y: f64, w: f64, h: f64, stroke: Color },
    Text(Text),
}

/// A white canvas of `width` x `height` px and what is drawn on it, in order.
pub struct Plot {
    width: f64,
    height: f64,
    items: Vec<Item>,
}

impl Plot {
    pub fn new(width: f64, height: f64) -> Plot {
        Plot { width, height, items: Vec::new() }
    }

    pub fn line(&mut self, (x1, y1): (f64, f64), (x2, y2): (f64, f64), color: Color, width: f64) {
        self.polyline(vec![(x1, y1), (x2, y2)], color, width);
    }

    pub fn polyline(&mut self, points: Vec<(f64, f64)>, color: Color, width: f64) {
        self.items.push(Item::Polyline { points, color, width });
    }

    /// An outlined rectangle (1 px).
    pub fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, stroke: Color) {
        self.items.push(Item::Rect { x, y, w, h, stroke });
    }

    pub fn text(&mut self, text: Text) {
        self.items.push(Item::Text(text));
    }

    /// The plot as a standalone SVG document.
    pub fn to_svg(&self) -> String {
        let (w, h) = (self.width, self.height);
        let mut s = String::new();
        let _ = writeln!(s, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="13">"#
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        for item in &self.items {
            match item {
                Item::Polyline { points, color, width } => {
                    let pts: Vec<String> = points.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
                    let _ = writeln!(
                        s,
                        r#"<polyline fill="none" stroke="{}" stroke-width="{width}" points="{}"/>"#,
                        color.hex(),
                        pts.join(" ")
                    );
                }
                Item::Rect { x, y, w, h, stroke } => {
                    let _ = writeln!(
                        s,
                        r#"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" fill="none" stroke="{}"/>"#,
                        stroke.hex()
                    );
                }
                Item::Text(t) => {
                    let mut attrs = format!(r#"x="{:.1}" y="{:.1}" text-anchor="{}""#, t.x, t.y, t.anchor.svg());
                    if t.size != 13.0 {
                        let _ = write!(attrs, r#" font-size="{}""#, t.size);
                    }
                    if t.bold {
                        attrs.push_str(r#" font-weight="bold""#);
                    }
                    if t.color != Color::BLACK {
                        let _ = write!(attrs, r#" fill="{}""#, t.color.hex());
                    }
                    if t.vertical {
                        let _ = write!(attrs, r#" transform="rotate(-90 {:.1} {:.1})""#, t.x, t.y);
                    }
                    let _ = writeln!(s, "<text {attrs}>{}</text>", xml_escape(&t.text));
                }
            }
        }
        let _ = writeln!(s, "</svg>");
        s
    }

    /// The plot as a PNG image.
    pub fn to_png(&self) -> Result<Vec<u8>, String> {
        let (w, h) = (self.width.round() as u32, self.height.round() as u32);
        let mut pixmap = tiny_skia::Pixmap::new(w, h).ok_or_else(|| format!("cannot make a {w}x{h} image"))?;
        pixmap.fill(tiny_skia::Color::WHITE);
        for item in &self.items {
            match item {
                Item::Polyline { points, color, width } => {
                    let mut pb = tiny_skia::PathBuilder::new();
                    for (i, &(x, y)) in points.iter().enumerate() {
                        if i == 0 {
                            pb.move_to(x as f32, y as f32);
                        } else {
                            pb.line_to(x as f32, y as f32);
                        }
                    }
                    stroke(&mut pixmap, pb.finish(), *color, *width);
                }
                Item::Rect { x, y, w, h, stroke: color } => {
                    if let Some(r) = tiny_skia::Rect::from_xywh(*x as f32, *y as f32, *w as f32, *h as f32) {
                        stroke(&mut pixmap, Some(tiny_skia::PathBuilder::from_rect(r)), *color, 1.0);
                    }
                }
                Item::Text(t) => draw_text(&mut pixmap, t),
            }
        }
        pixmap.encode_png().map_err(|e| format!("cannot encode the PNG image: {e}"))
    }
}

fn stroke(pixmap: &mut tiny_skia::Pixmap, path: Option<tiny_skia::Path>, color: Color, width: f64) {
    let Some(path) = path else { return };
    let mut paint = tiny_skia::Paint::default();
    paint.set_color(color.skia());
    paint.anti_alias = true;
    let stroke = tiny_skia::Stroke { width: width as f32, ..Default::default() };
    pixmap.stroke_path(&path, &paint, &stroke, tiny_skia::Transform::identity(), None);
}

/// The 8x8 glyph of `c` (rows top down, bit 0 the leftmost pixel); `?` for a
/// character the font lacks.
fn glyph(c: char) -> [u8; 8] {
    font8x8::BASIC_FONTS
        .get(c)
        .or_else(|| font8x8::LATIN_FONTS.get(c))
        .or_else(|| font8x8::GREEK_FONTS.get(c))
        .or_else(|| font8x8::BASIC_FONTS.get('?'))
        .unwrap_or([0; 8])
}

/// Text from the 8x8 font, each font pixel a square of `scale` px: scale 1 (8 px
/// glyphs) below 18 px text, 2 from there. Glyphs advance 8 font pixels; the
/// baseline is the glyph's seventh row.
fn draw_text(pixmap: &mut tiny_skia::Pixmap, t: &Text) {
    let scale = if t.size >= 18.0 { 2.0 } else { 1.0 };
    let chars: Vec<char> = t.text.chars().collect();
    let advance = 8.0 * scale;
    let len = advance * chars.len() as f64;
    let start = match t.anchor {
        Anchor::Start => 0.0,
        Anchor::Middle => -len / 2.0,
        Anchor::End => -len,
    };
    let mut paint = tiny_skia::Paint::default();
    paint.set_color(t.color.skia());
    // Position along the text (u, rightwards or upwards) and across it (v, down
    // from the glyph's top) to the image.
    let at = |u: f64, v: f64| -> (f64, f64) {
        let top = -7.0 * scale;
        if t.vertical {
            (t.x + top + v, t.y - u)
        } else {
            (t.x + u, t.y + top + v)
        }
    };
    for (i, c) in chars.iter().enumerate() {
        let rows = glyph(*c);
        for (row, bits) in rows.iter().enumerate() {
            for col in 0..8 {
                let on = bits & (1 << col) != 0 || (t.bold && col > 0 && bits & (1 << (col - 1)) != 0);
                if !on {
                    continue;
                }
                let u = start + i as f64 * advance + col as f64 * scale;
                let v = row as f64 * scale;
                // The square's top-left corner: upwards text runs from its bottom.
                let (x, y) = if t.vertical { at(u + scale, v) } else { at(u, v) };
                if let Some(r) = tiny_skia::Rect::from_xywh(x as f32, y as f32, scale as f32, scale as f32) {
                    pixmap.fill_rect(r, &paint, tiny_skia::Transform::identity(), None);
                }
            }
        }
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Plot {
        let mut p = Plot::new(200.0, 100.0);
        p.rect(10.0, 10.0, 180.0, 80.0, Color::BLACK);
        p.polyline(vec![(10.0, 90.0), (100.0, 50.0), (190.0, 10.0)], Color(0x1f, 0x77, 0xb4), 2.0);
        p.text(Text::new(100.0, 30.0, "p50 <1 µs", 13.0, Anchor::Middle));
        p.text(Text { vertical: true, ..Text::new(8.0, 60.0, "ms", 13.0, Anchor::Middle) });
        p
    }

    #[test]
    fn svg_has_every_item_escaped() {
        let svg = sample().to_svg();
        assert!(svg.starts_with("<?xml") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains(r##"<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="10.0,90.0 100.0,50.0 190.0,10.0"/>"##), "{svg}");
        assert!(svg.contains("p50 &lt;1 µs"), "{svg}");
        assert!(svg.contains(r#"transform="rotate(-90 8.0 60.0)""#), "{svg}");
    }

    /// The decoded image: (width, height, RGBA pixels).
    fn decode(png: &[u8]) -> (u32, u32, Vec<u8>) {
        let pixmap = tiny_skia::Pixmap::decode_png(png).expect("a PNG tiny-skia reads back");
        (pixmap.width(), pixmap.height(), pixmap.data().to_vec())
    }

    fn pixel(img: &(u32, u32, Vec<u8>), x: u32, y: u32) -> [u8; 3] {
        let i = ((y * img.0 + x) * 4) as usize;
        [img.2[i], img.2[i + 1], img.2[i + 2]]
    }

    #[test]
    fn png_draws_lines_shapes_and_text() {
        let png = sample().to_png().unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let img = decode(&png);
        assert_eq!((img.0, img.1), (200, 100));
        // Background, the frame's left edge, the series' middle point.
        assert_eq!(pixel(&img, 50, 95), [255, 255, 255]);
        assert_ne!(pixel(&img, 10, 50), [255, 255, 255], "the rectangle's edge");
        let mid = pixel(&img, 100, 50);
        assert!(mid[2] > mid[0], "the blue series at its middle point, got {mid:?}");
        // Text: some dark pixels in the label's box, none outside the drawn items.
        let dark = |x0: u32, x1: u32, y0: u32, y1: u32| {
            (y0..y1).flat_map(|y| (x0..x1).map(move |x| (x, y))).filter(|&(x, y)| pixel(&img, x, y)[0] < 128).count()
        };
        assert!(dark(64, 136, 23, 31) > 20, "the horizontal label");
        assert!(dark(1, 9, 40, 80) > 5, "the vertical label");
        assert_eq!(dark(150, 185, 70, 85), 0);
    }

    #[test]
    fn glyphs_cover_the_plot_text() {
        for c in "0123456789.,%()µ:-/abcxyzABCXYZ".chars() {
            assert_ne!(glyph(c), [0; 8], "{c:?}");
        }
        assert_eq!(glyph(' '), [0; 8]);
        assert_eq!(glyph('\u{2603}'), glyph('?'), "a missing character is drawn as '?'");
    }
}
