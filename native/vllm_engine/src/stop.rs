//! Stop strings over streamed text: where the first one starts, and how much of the text's
//! end must be held back because it could still grow into one.

/// The earliest stop string that starts at or after byte `from` of `text`:
/// (its start, the stop string). Earlier starts win; at one start, the longer stop wins.
pub fn find_stop<'a>(text: &str, from: usize, stops: &'a [String]) -> Option<(usize, &'a str)> {
    let from = floor_char_boundary(text, from);
    let mut best: Option<(usize, &str)> = None;
    for stop in stops {
        if let Some(i) = text[from..].find(stop.as_str()) {
            let i = from + i;
            let better = match best {
                None => true,
                Some((j, s)) => i < j || (i == j && stop.len() > s.len()),
            };
            if better {
                best = Some((i, stop));
            }
        }
    }
    best
}

/// Bytes at the end of `text` that are a proper prefix of some stop string, so must not
/// be streamed yet.
pub fn hold_back(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for stop in stops {
        for (k, _) in stop.char_indices().skip(1) {
            if k > hold && text.ends_with(&stop[..k]) {
                hold = k;
            }
        }
    }
    hold
}

fn floor_char_boundary(text: &str, mut i: usize) -> usize {
    i = i.min(text.len());
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn finds_the_earliest_stop() {
        let s = stops(&["cd", "b"]);
        assert_eq!(find_stop("abcd", 0, &s), Some((1, "b")));
        assert_eq!(find_stop("abcd", 2, &s), Some((2, "cd")));
        assert_eq!(find_stop("abcd", 3, &s), None);
    }

    #[test]
    fn holds_back_partial_stops_only() {
        let s = stops(&["END", "é!"]);
        assert_eq!(hold_back("the EN", &s), 2);
        assert_eq!(hold_back("the E", &s), 1);
        assert_eq!(hold_back("the X", &s), 0);
        assert_eq!(hold_back("caf é", &s), "é".len());
        // A whole stop string is found by find_stop, not held back.
        assert_eq!(hold_back("END", &s), 0);
    }
}
