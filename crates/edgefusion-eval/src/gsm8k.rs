//! GSM8K answer extraction and exact match.
//!
//! Our answer ([`extract`]) is the `#### N` form if the generation has one (the GSM8K
//! solutions' own marker; lm-evaluation-harness `gsm8k`'s "strict-match"), else the
//! harness's "flexible-extract": the last match of `(-?[$0-9.,]{2,})|(-?[0-9]+)`, which after
//! `gsm8k_cot`'s exemplars is the N of "The answer is N.". The harness's own `gsm8k_cot`
//! strict filter ("The answer is N") is [`strict_cot`], so both harness columns can be
//! reported as well ([`Gsm8kScore`]).
//!
//! Exact match is the harness's `exact_match` with `gsm8k`'s settings: from both the answer
//! and the reference remove every `,` and `$`, everything up to the last `"#### "`, one
//! trailing `.`, then compare case-insensitively ([`normalize`]). Like the harness, this does
//! not parse numbers: "18.00" is not "18", and "1,000" is "1000".
//!
//! The filters are regexes run with the `regex` crate, whose leftmost-first matching and
//! capture groups give what Python's `re.findall` gives for these patterns (no
//! backreferences or lookaround), including the harness's quirks, which the tests pin.

use std::sync::OnceLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

/// Which rule found an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rule {
    /// `#### N`.
    Hash,
    /// The last number-like run of the text.
    Flexible,
}

/// An answer found in a generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extracted {
    pub answer: String,
    pub rule: Rule,
}

fn regex(cell: &'static OnceLock<Regex>, pattern: &str) -> &'static Regex {
    cell.get_or_init(|| Regex::new(pattern).expect("constant regex"))
}

/// The first `#### N` (harness `gsm8k` "strict-match": `#### (\-?[0-9\.\,]+)`, take first).
pub fn strict_hash(text: &str) -> Option<String> {
    static RE: OnceLock<Regex> = OnceLock::new();
    first_group(regex(&RE, r"#### (-?[0-9.,]+)"), text)
}

/// The first "The answer is N" (harness `gsm8k_cot` "strict-match":
/// `The answer is (\-?[0-9\.\,]+).`, whose final `.` is any character, so "The answer is 18"
/// at the very end of a text yields "1").
pub fn strict_cot(text: &str) -> Option<String> {
    static RE: OnceLock<Regex> = OnceLock::new();
    first_group(regex(&RE, r"The answer is (-?[0-9.,]+)."), text)
}

fn first_group(re: &Regex, text: &str) -> Option<String> {
    let captures = re.captures(text)?;
    Some(captures.get(1)?.as_str().trim().to_string())
}

/// The last number-like run (harness "flexible-extract": `(-?[$0-9.,]{2,})|(-?[0-9]+)`,
/// `group_select: -1`, the first non-empty group of that match). Runs of two or more of
/// `$0-9.,` count, so "18." and "$5" are kept whole and a lone "..." also matches.
pub fn flexible(text: &str) -> Option<String> {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = regex(&RE, r"(-?[$0-9.,]{2,})|(-?[0-9]+)");
    let last = re.captures_iter(text).last()?;
    let group = last.get(1).or_else(|| last.get(2))?;
    Some(group.as_str().trim().to_string())
}

/// Our answer: `#### N` if present, else the last number ([`flexible`]); `None` when the text
/// holds no number at all (scored as wrong, as the harness's `"[invalid]"`).
pub fn extract(text: &str) -> Option<Extracted> {
    if let Some(answer) = strict_hash(text) {
        return Some(Extracted {
            answer,
            rule: Rule::Hash,
        });
    }
    flexible(text).map(|answer| Extracted {
        answer,
        rule: Rule::Flexible,
    })
}

/// The harness's `exact_match` normalisation for GSM8K (`regexes_to_ignore: [",", "\$",
/// "(?s).*#### ", "\.$"]`, `ignore_case: true`), applied in that order.
pub fn normalize(answer: &str) -> String {
    let mut text: String = answer.chars().filter(|&c| c != ',' && c != '$').collect();
    // "(?s).*#### " is greedy: it removes through the last "#### ".
    if let Some(at) = text.rfind("#### ") {
        text.drain(..at + "#### ".len());
    }
    // Python's `$` also matches before a final newline, so "\.$" removes the dot of "5.\n".
    if text.ends_with(".\n") {
        text.remove(text.len() - 2);
    } else if text.ends_with('.') {
        text.pop();
    }
    text.to_lowercase()
}

/// Whether an extracted answer equals the reference after [`normalize`]; no answer never
/// matches.
pub fn exact_match(answer: Option<&str>, target: &str) -> bool {
    answer.is_some_and(|answer| normalize(answer) == normalize(target))
}

/// One GSM8K item's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gsm8kScore {
    /// Our answer and the rule that found it.
    pub extracted: Option<Extracted>,
    /// Our metric: [`extract`] then [`exact_match`].
    pub exact_match: bool,
    /// The harness's `gsm8k_cot` "strict-match" column ([`strict_cot`]).
    pub harness_strict: bool,
    /// The harness's "flexible-extract" column ([`flexible`]).
    pub harness_flexible: bool,
}

/// Scores a generation (already cut at its stop sequence, [`crate::GenRequest::cut`])
/// against the reference answer.
pub fn score(generation: &str, target: &str) -> Gsm8kScore {
    let extracted = extract(generation);
    Gsm8kScore {
        exact_match: exact_match(extracted.as_ref().map(|e| e.answer.as_str()), target),
        harness_strict: exact_match(strict_cot(generation).as_deref(), target),
        harness_flexible: exact_match(flexible(generation).as_deref(), target),
        extracted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(text: &str) -> Option<String> {
        extract(text).map(|e| e.answer)
    }

    #[test]
    fn hash_form_wins_over_later_numbers() {
        let e = extract("Janet sells 9 eggs.\n#### 18\nThen 5 more").unwrap();
        assert_eq!((e.answer.as_str(), e.rule), ("18", Rule::Hash));
        assert_eq!(strict_hash("#### -3"), Some("-3".into()));
        assert_eq!(strict_hash("#### 1,234.5"), Some("1,234.5".into()));
        assert_eq!(strict_hash("#### 4 and #### 5"), Some("4".into()));
        // No space after the marker: not the strict form, but the last number still counts.
        assert_eq!(strict_hash("####42"), None);
        assert_eq!(extract("####42").unwrap().rule, Rule::Flexible);
        assert_eq!(ours("####42").as_deref(), Some("42"));
    }

    #[test]
    fn flexible_takes_the_last_number() {
        let cases: &[(&str, Option<&str>)] = &[
            ("The answer is 18.", Some("18.")),
            ("A: 5 + 4 = 9. The answer is 9.\n\n", Some("9.")),
            ("It is 7", Some("7")),
            ("It is -7 degrees", Some("-7")),
            ("-12 and then -3.5", Some("-3.5")),
            ("She pays $1,234.50 in total", Some("$1,234.50")),
            ("costs 5 then 12, so", Some("12,")),
            ("1/2 of them", Some("2")),
            ("3.14159", Some("3.14159")),
            ("x = 10,000.00", Some("10,000.00")),
            ("no number here", None),
            ("", None),
            // The harness's quirk: two dots are number-like.
            ("I have 2 cats.. ok", Some("..")),
            ("a - b", None),
        ];
        for (text, expected) in cases {
            assert_eq!(flexible(text).as_deref(), *expected, "{text:?}");
        }
    }

    #[test]
    fn strict_cot_is_the_harness_pattern() {
        // Greedy digits take the "." and the pattern's last "." takes the space after it.
        assert_eq!(
            strict_cot("So 6. The answer is 6. Q:").as_deref(),
            Some("6.")
        );
        assert_eq!(
            strict_cot("The answer is -2,000.").as_deref(),
            Some("-2,000")
        );
        assert_eq!(
            strict_cot("The answer is 18 dollars.").as_deref(),
            Some("18")
        );
        // The final "." of the pattern is any character: at the very end it eats a digit.
        assert_eq!(strict_cot("The answer is 18").as_deref(), Some("1"));
        assert_eq!(strict_cot("the answer is 18.").as_deref(), None);
        assert_eq!(strict_cot("The answer is eighteen.").as_deref(), None);
    }

    #[test]
    fn normalisation_strips_commas_dollars_marker_and_one_final_dot() {
        let cases = [
            ("18.", "18"),
            ("$18", "18"),
            ("1,000", "1000"),
            ("$1,234.50", "1234.50"),
            ("5..", "5."),
            ("5.\n", "5\n"),
            ("The total #### 42", "42"),
            ("a #### b #### 7", "7"),
            ("-3", "-3"),
            ("[INVALID]", "[invalid]"),
        ];
        for (raw, normal) in cases {
            assert_eq!(normalize(raw), normal, "{raw:?}");
        }
    }

    #[test]
    fn exact_match_cases() {
        let cases: &[(&str, &str, bool)] = &[
            ("The answer is 18.", "18", true),
            ("#### 18", "18", true),
            ("She makes $18 every day.", "18", true),
            ("-5", "-5", true),
            ("The answer is -5.", "5", false),
            ("2.5 hours", "2.5", true),
            ("That is 1,000 dollars.", "1000", true),
            ("That is 1,000 dollars.", "1,000", true),
            // Not parsed as numbers, as in the harness.
            ("It is 18.00", "18", false),
            ("It is 018", "18", false),
            ("No idea.", "18", false),
            ("", "0", false),
            // The last number wins, even when the right one came first.
            ("18 eggs, minus 3", "18", false),
        ];
        for (generation, target, expected) in cases {
            assert_eq!(
                exact_match(ours(generation).as_deref(), target),
                *expected,
                "{generation:?} vs {target:?}"
            );
        }
        assert!(!exact_match(None, "18"));
    }

    #[test]
    fn score_reports_ours_and_both_harness_columns() {
        let s = score(
            " Janet has 16 - 3 - 4 = 9 eggs. 9 * 2 = 18. The answer is 18.\n\n",
            "18",
        );
        assert!(s.exact_match && s.harness_strict && s.harness_flexible);
        assert_eq!(s.extracted.unwrap().rule, Rule::Flexible);
        let s = score(" 9 * 2 = 18 dollars", "18");
        assert!(s.exact_match && !s.harness_strict && s.harness_flexible);
        let s = score(" The answer is 18. Or maybe 20", "18");
        assert!(!s.exact_match && s.harness_strict && !s.harness_flexible);
        let s = score("I cannot say", "18");
        assert_eq!(s.extracted, None);
        assert!(!s.exact_match && !s.harness_strict && !s.harness_flexible);
    }
}
