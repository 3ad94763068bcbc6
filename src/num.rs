//! Counts computed in `f64` that should land on a whole number: a share of a
//! limit (`0.57 × 100`), a ratio of recent requests (`0.29 × 100`). Both
//! products are rounded, and land a hair below the whole number
//! (56.999999999999993, 28.999999999999996) as often as above it: taken as
//! they are, `⌊0.57 × 100⌋` is 56 and "more than 0.57 of 100" holds at 57.
//! Here a product within its rounding (2⁻⁴⁰ of its size — a product of two
//! rounded numbers is off by a few 2⁻⁵³) of a whole number counts as that
//! number. The pacer's cells, sums of many times, count in whole ticks
//! instead (`pace::tick`: exact sums).

/// How close to a whole number, relative to it, a product counts as it.
const ROUNDING: f64 = 1.0 / (1u64 << 40) as f64;

/// `x` as the whole number it is within rounding, else `x` unchanged.
#[inline]
fn snapped(x: f64) -> f64 {
    let r = x.round();
    if (x - r).abs() <= r.abs() * ROUNDING {
        r
    } else {
        x
    }
}

/// `⌊share × n⌋`, with a product within rounding of a whole number taken as
/// it (`⌊0.57 × 100⌋` is 57).
#[inline]
pub(crate) fn floor_of(share: f64, n: f64) -> f64 {
    snapped(share * n).floor()
}

/// Whether `count` is more than `allowed` (a rounded product or sum), an
/// `allowed` within rounding of a whole number taken as it (57 is not more
/// than `0.57 × 100`).
#[inline]
pub(crate) fn exceeds(count: f64, allowed: f64) -> bool {
    count > snapped(allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_of_whole_numbers_land_on_them() {
        // Each product is below the whole number it stands for.
        let (a, b) = std::hint::black_box((0.57, 0.29));
        assert!(a * 100.0 < 57.0);
        assert!(b * 100.0 < 29.0);
        assert_eq!(floor_of(0.57, 100.0), 57.0);
        assert_eq!(floor_of(0.29, 100.0), 29.0);
        assert!(!exceeds(57.0, 0.57 * 100.0));
        assert!(exceeds(58.0, 0.57 * 100.0));
        assert!(!exceeds(29.0, 0.29 * 100.0));
        // Every share of a hundredth, of every n up to 1,000: exact.
        let mut below = 0;
        for p in 0..=100u32 {
            let share = f64::from(p) / 100.0;
            for n in 0..=1_000u32 {
                let exact = u64::from(p) * u64::from(n) / 100;
                below += usize::from(((share * f64::from(n)).floor() as u64) < exact);
                assert_eq!(floor_of(share, f64::from(n)) as u64, exact, "{share} × {n}");
                let allowed = share * f64::from(n);
                for c in [exact, exact + 1] {
                    assert_eq!(
                        exceeds(c as f64, allowed),
                        c * 100 > u64::from(p) * u64::from(n),
                        "{c} against {share} × {n}"
                    );
                }
            }
        }
        // (49 of the 101,101 products.)
        assert!(below > 20, "{below}: the plain floor was wrong that often");
        // Not whole: unchanged.
        assert_eq!(floor_of(0.5, 3.0), 1.0);
        assert!(exceeds(2.0, 1.5) && !exceeds(1.0, 1.5));
        assert_eq!(floor_of(0.0, 7.0), 0.0);
        assert!(!exceeds(f64::NAN, 1.0));
    }
}
