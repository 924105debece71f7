//! The hand-written man pages in `man/` document exactly the flags the binaries have
//! (STYLE rules 32 and 33): every `mvps-te` flag, its `MVPS_TE_*` variable and its default
//! appear in `man/mvps-te.8`; every command that `mvpsctl --help` lists has a subsection
//! `.SS mvpsctl CMD` of OPTIONS in `man/mvpsctl.1` with each of its options and defaults, and
//! its flags in SYNOPSIS; `mvpsctl txn`'s exit codes are under EXIT STATUS; and neither page's
//! OPTIONS section names a flag that does not exist. `man/mvps-s3-gc.8` likewise documents
//! every `mvps-s3-gc` flag with its default, its `MVPS_S3_GC_*` variable and the exit codes.
//! The pages must also format without groff warnings.
//!
//! The roff is reduced to plain text by a small renderer below (escapes such as `\-` and
//! `\fB`, and the font-alternating macros `.BR`, `.IR`, ...), enough for these checks.

use argh::FromArgs;
use mvps::config::{env_name, Config, FLAGS};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

const SERVER_PAGE: &str = "man/mvps-te.8";
const CTL_PAGE: &str = "man/mvpsctl.1";
const GC_PAGE: &str = "man/mvps-s3-gc.8";

/// The sections each page must have, in this order (ripgrep's order, then ours).
const SERVER_SECTIONS: &[&str] = &[
    "NAME",
    "SYNOPSIS",
    "DESCRIPTION",
    "OPTIONS",
    "ENVIRONMENT",
    "IMAGE STORES",
    "EXPORT NAMES",
    "NBD PROTOCOL",
    "TRANSACTIONS",
    "DURABILITY",
    "FILES",
    "SIGNALS",
    "EXIT STATUS",
    "EXAMPLES",
    "SEE ALSO",
];
const CTL_SECTIONS: &[&str] = &[
    "NAME",
    "SYNOPSIS",
    "DESCRIPTION",
    "OPTIONS",
    "ENVIRONMENT",
    "FILES",
    "EXIT STATUS",
    "EXAMPLES",
    "SEE ALSO",
];

const GC_SECTIONS: &[&str] = &[
    "NAME",
    "SYNOPSIS",
    "DESCRIPTION",
    "OPTIONS",
    "ENVIRONMENT",
    "EXIT STATUS",
    "EXAMPLES",
    "SEE ALSO",
];

/// Flags argh adds to every command.
const BUILTIN_FLAGS: &[&str] = &["help"];

// ------------------------------------------------------------------------------ roff → text

/// Replaces roff escapes with the characters they print; drops font changes and zero-width
/// escapes.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('-') => out.push('-'),
            Some('e') | Some('\\') => out.push('\\'),
            Some(' ') | Some('~') => out.push(' '),
            Some('&') | Some('%') | Some('c') | Some('/') | Some(',') => {}
            Some('f') => match chars.next() {
                Some('(') => {
                    chars.next();
                    chars.next();
                }
                Some('[') => {
                    for c in chars.by_ref() {
                        if c == ']' {
                            break;
                        }
                    }
                }
                _ => {}
            },
            Some('(') => {
                let name: String = chars.by_ref().take(2).collect();
                out.push_str(match name.as_str() {
                    "ha" => "^",
                    "ti" => "~",
                    "aq" => "'",
                    "ga" => "`",
                    "lq" | "rq" | "dq" => "\"",
                    "em" | "en" => "-",
                    "mi" => "-",
                    _ => "?",
                });
            }
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// Splits a macro line's arguments the way roff does: on spaces, except inside double quotes
/// or after a backslash.
fn macro_args(s: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut started = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                cur.push(c);
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                started = true;
            }
            '"' => {
                quoted = !quoted;
                started = true;
            }
            ' ' | '\t' if !quoted => {
                if started {
                    args.push(std::mem::take(&mut cur));
                    started = false;
                }
            }
            _ => {
                cur.push(c);
                started = true;
            }
        }
    }
    if started {
        args.push(cur);
    }
    args
}

#[derive(Debug, Clone)]
enum Line {
    /// A request that only structures the page: `.TP`, `.PP`, `.SH NAME`, ...
    Request { name: String, text: String },
    /// Printed text (from a text line or a font macro such as `.BR`).
    Text(String),
}

fn render(roff: &str) -> Vec<Line> {
    let mut lines = Vec::new();
    for raw in roff.lines() {
        let Some(rest) = raw.strip_prefix('.').or_else(|| raw.strip_prefix('\'')) else {
            lines.push(Line::Text(unescape(raw)));
            continue;
        };
        if rest.starts_with("\\\"") || rest.trim().is_empty() {
            continue; // comment, or an empty request
        }
        let (name, args) = rest.split_once([' ', '\t']).unwrap_or((rest, ""));
        let args: Vec<String> = macro_args(args).iter().map(|a| unescape(a)).collect();
        match name {
            "B" | "I" | "SM" | "SB" => lines.push(Line::Text(args.join(" "))),
            "BR" | "RB" | "IR" | "RI" | "BI" | "IB" => lines.push(Line::Text(args.concat())),
            _ => lines.push(Line::Request {
                name: name.to_string(),
                text: args.join(" "),
            }),
        }
    }
    lines
}

struct Section {
    name: String,
    lines: Vec<Line>,
}

impl Section {
    fn text(&self) -> String {
        let mut s = String::new();
        for l in &self.lines {
            if let Line::Text(t) = l {
                s.push_str(t);
                s.push(' ');
            }
        }
        s
    }

    /// The parts of the section split at `.SS`: the text before the first `.SS` (named ""),
    /// then one per subsection, named by its heading.
    fn subsections(&self) -> Vec<Section> {
        let mut out = vec![Section {
            name: String::new(),
            lines: Vec::new(),
        }];
        for l in &self.lines {
            match l {
                Line::Request { name, text } if name == "SS" => out.push(Section {
                    name: text.clone(),
                    lines: Vec::new(),
                }),
                l => out.last_mut().unwrap().lines.push(l.clone()),
            }
        }
        out
    }

    /// `.TP` items: (tag, tag and body text). A body ends at the next `.TP`, `.PP`, `.SS`.
    fn items(&self) -> Vec<(String, String)> {
        let mut items: Vec<(String, String)> = Vec::new();
        let mut state = 0; // 0: outside an item, 1: expecting the tag, 2: in the body
        for l in &self.lines {
            match l {
                Line::Request { name, .. } if name == "TP" => state = 1,
                Line::Request { name, .. }
                    if ["PP", "LP", "P", "SS", "IP"].contains(&name.as_str()) =>
                {
                    state = 0
                }
                Line::Request { .. } => {}
                Line::Text(t) if state == 1 => {
                    items.push((t.trim().to_string(), t.clone()));
                    state = 2;
                }
                Line::Text(t) if state == 2 => {
                    let body = &mut items.last_mut().unwrap().1;
                    body.push(' ');
                    body.push_str(t);
                }
                Line::Text(_) => {}
            }
        }
        items
    }
}

struct Page {
    path: &'static str,
    title: String,
    sections: Vec<Section>,
}

impl Page {
    fn load(path: &'static str) -> Page {
        let full = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path);
        let roff = std::fs::read_to_string(&full)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", full.display()));
        let mut title = String::new();
        let mut sections: Vec<Section> = Vec::new();
        for l in render(&roff) {
            match l {
                Line::Request { name, text } if name == "TH" => title = text,
                Line::Request { name, text } if name == "SH" => sections.push(Section {
                    name: text,
                    lines: Vec::new(),
                }),
                l => {
                    if let Some(s) = sections.last_mut() {
                        s.lines.push(l);
                    }
                }
            }
        }
        Page {
            path,
            title,
            sections,
        }
    }

    fn section(&self, name: &str) -> &Section {
        self.sections
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("{}: no {name} section", self.path))
    }

    fn check_sections(&self, wanted: &[&str]) {
        let have: Vec<&str> = self.sections.iter().map(|s| s.name.as_str()).collect();
        let mut it = have.iter();
        for w in wanted {
            assert!(
                it.any(|h| h == w),
                "{}: section {w} missing or out of order; want {wanted:?} in this order, have {have:?}",
                self.path
            );
        }
    }

    fn check_version(&self) {
        let want = format!("mvps {}", env!("CARGO_PKG_VERSION"));
        assert!(
            self.title.contains(&want),
            "{}: .TH line {:?} should name {want:?} (the package version)",
            self.path,
            self.title
        );
    }
}

/// Every `--flag` in `text`, longest match (so `--image-store` is not found in
/// `--image-store-s3-bucket`).
fn long_flags(text: &str) -> Vec<String> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i + 2 < b.len() {
        let boundary = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'-');
        if boundary && b[i] == b'-' && b[i + 1] == b'-' && b[i + 2].is_ascii_lowercase() {
            let start = i + 2;
            let mut end = start;
            while end < b.len()
                && (b[end].is_ascii_lowercase() || b[end].is_ascii_digit() || b[end] == b'-')
            {
                end += 1;
            }
            out.push(text[start..end].trim_end_matches('-').to_string());
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

/// Whether `text` holds `needle` with no letter, digit or `-`, `_` right after it.
fn contains_word(text: &str, needle: &str) -> bool {
    text.match_indices(needle).any(|(i, _)| {
        text[i + needle.len()..]
            .chars()
            .next()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
    })
}

// ----------------------------------------------------------------------------- --help text

/// argh `--help` output → (flag, description) for each option, continuation lines joined.
fn help_options(help: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut in_options = false;
    for line in help.lines() {
        if line.trim_end() == "Options:" {
            in_options = true;
            continue;
        }
        if !in_options {
            continue;
        }
        if line.trim().is_empty() {
            break;
        }
        if let Some(rest) = line.strip_prefix("  --") {
            let (flag, desc) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            out.push((
                flag.trim_end_matches(',').to_string(),
                desc.trim().to_string(),
            ));
        } else if let Some(last) = out.last_mut() {
            last.1.push(' ');
            last.1.push_str(line.trim());
        }
    }
    assert!(
        !out.is_empty(),
        "no options found in this --help output:\n{help}"
    );
    out
}

/// The value after `(default ` in a help description, e.g. `60000`, `./mvps-data`, `30d`.
/// `None` when the description has no such value (`local (default) or s3`).
fn help_default(desc: &str) -> Option<String> {
    let (_, rest) = desc.split_once("(default ")?;
    let v: String = rest
        .chars()
        .take_while(|c| !c.is_whitespace() && !"();".contains(*c))
        .collect();
    let v = v.trim_end_matches([':', ',', '.']).to_string();
    (!v.is_empty()).then_some(v)
}

fn server_help() -> String {
    match Config::from_args(&["mvps-te"], &["--help"]) {
        Err(e) => e.output,
        Ok(_) => panic!("--help parsed as a configuration"),
    }
}

/// `mvpsctl [ARGS...] --help`.
fn ctl_help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_mvpsctl"))
        .args(args)
        .arg("--help")
        .output()
        .expect("run mvpsctl --help");
    assert!(
        out.status.success(),
        "mvpsctl {args:?} --help failed: {out:?}"
    );
    String::from_utf8(out.stdout).expect("--help is UTF-8")
}

/// The first word of each line of an argh `--help` block headed `heading` (`Commands:`,
/// `Error codes:`), up to the next blank line.
fn help_block_words(help: &str, heading: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in help.lines() {
        if line.trim_end() == heading {
            inside = true;
            continue;
        }
        if !inside {
            continue;
        }
        if line.trim().is_empty() {
            break;
        }
        // Continuation lines are indented further than the entries.
        if line.starts_with("  ") && !line.starts_with("   ") {
            if let Some(w) = line.split_whitespace().next() {
                out.push(w.to_string());
            }
        }
    }
    out
}

/// The commands `mvpsctl --help` lists.
fn ctl_commands() -> Vec<String> {
    let cmds = help_block_words(&ctl_help(&[]), "Commands:");
    assert!(
        cmds.iter().any(|c| c == "token") && cmds.iter().any(|c| c == "txn"),
        "mvpsctl --help should list token and txn, lists {cmds:?}"
    );
    cmds
}

// ---------------------------------------------------------------------------------- checks

/// Checks OPTIONS against a command's flags. `scope` is the `.SS` subsection that documents
/// the command (`None`: the whole section). In it: one item per flag, tagged with that flag
/// (a flag argh adds to every command, `--help`, may instead have its one item anywhere in
/// OPTIONS); no item for a flag the command lacks; no mention of a flag that neither the
/// command nor `also_known` has (e.g. a server flag that a client option refers to); and each
/// flag's default stated as `Default: X`. `extra_sections` are checked for mentions too.
fn check_options(
    page: &Page,
    scope: Option<&str>,
    flags: &[(String, String)],
    also_known: &[&str],
    extra_sections: &[&str],
) {
    let own: BTreeSet<&str> = flags.iter().map(|(f, _)| f.as_str()).collect();
    let known: BTreeSet<&str> = own
        .iter()
        .copied()
        .chain(also_known.iter().copied())
        .collect();
    let options = page.section("OPTIONS");
    let part = match scope {
        None => Section {
            name: options.name.clone(),
            lines: options.lines.clone(),
        },
        Some(name) => options
            .subsections()
            .into_iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("{}: OPTIONS has no subsection .SS {name}", page.path)),
    };
    let what = scope.unwrap_or("OPTIONS");

    let tagged = |items: Vec<(String, String)>| -> Vec<(String, String)> {
        items
            .into_iter()
            .map(|(tag, body)| {
                let first = long_flags(&tag).into_iter().next().unwrap_or_else(|| {
                    panic!("{}: {what}: item {tag:?} names no --flag", page.path)
                });
                (first, body)
            })
            .collect()
    };
    let documented = tagged(part.items());
    let everywhere = tagged(options.items());
    for (flag, _) in &documented {
        assert!(
            own.contains(flag.as_str()),
            "{}: {what} has an item for --{flag}, which the command does not have \
             (its flags: {own:?})",
            page.path
        );
    }
    for (flag, _) in flags {
        let n = documented.iter().filter(|(f, _)| f == flag).count();
        let n = if n == 0 && BUILTIN_FLAGS.contains(&flag.as_str()) {
            everywhere.iter().filter(|(f, _)| f == flag).count()
        } else {
            n
        };
        assert_eq!(
            n, 1,
            "{}: {what} should have exactly one item for --{flag}, has {n}",
            page.path
        );
    }

    let mut texts = vec![(what.to_string(), part.text())];
    for section in extra_sections {
        texts.push((section.to_string(), page.section(section).text()));
    }
    for (name, text) in texts {
        for f in long_flags(&text) {
            assert!(
                known.contains(f.as_str()),
                "{}: {name} mentions --{f}, which is not a flag (known: {known:?})",
                page.path
            );
        }
    }

    for (flag, desc) in flags {
        if BUILTIN_FLAGS.contains(&flag.as_str()) || flag == "version" {
            continue;
        }
        let body = &documented.iter().find(|(f, _)| f == flag).unwrap().1;
        assert!(
            body.to_ascii_lowercase().contains("default"),
            "{}: --{flag} should state its default (rule 33), or say it has none",
            page.path
        );
        if let Some(d) = help_default(desc) {
            assert!(
                contains_word(body, &format!("Default: {d}")),
                "{}: --{flag}: --help says the default is {d:?}, the page does not say \
                 \"Default: {d}\":\n{body}",
                page.path
            );
        }
    }
}

#[test]
fn server_page_sections_and_version() {
    let page = Page::load(SERVER_PAGE);
    page.check_sections(SERVER_SECTIONS);
    page.check_version();
}

#[test]
fn server_page_documents_every_flag_and_only_those() {
    let page = Page::load(SERVER_PAGE);
    let help = help_options(&server_help());
    // FLAGS is what the environment merge uses; --help is what argh parses. Both must be
    // covered (the config unit test keeps them equal).
    for (flag, _) in FLAGS {
        assert!(
            help.iter().any(|(f, _)| f == flag),
            "FLAGS has --{flag}, --help does not"
        );
    }
    check_options(&page, None, &help, &[], &["ENVIRONMENT"]);
}

#[test]
fn server_page_documents_every_environment_variable() {
    let page = Page::load(SERVER_PAGE);
    let env = page.section("ENVIRONMENT");
    let items = env.items();
    let item = |var: &str| {
        items
            .iter()
            .find(|(tag, _)| tag == var)
            .map(|(_, body)| body.clone())
    };

    let mut wanted = BTreeSet::new();
    for (flag, _) in FLAGS {
        let var = env_name("MVPS_TE_", flag);
        let body = item(&var).unwrap_or_else(|| {
            panic!("{SERVER_PAGE}: ENVIRONMENT has no item for {var} (--{flag})")
        });
        assert!(
            long_flags(&body).iter().any(|f| f == flag),
            "{SERVER_PAGE}: the ENVIRONMENT item {var} should refer to --{flag}:\n{body}"
        );
        wanted.insert(var);
    }
    for var in [
        "MVPS_TE_JWT_SECRET",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
        "S3_ENDPOINT",
    ] {
        assert!(
            item(var).is_some(),
            "{SERVER_PAGE}: ENVIRONMENT has no item for {var}"
        );
    }
    for (tag, _) in &items {
        if tag.starts_with("MVPS_TE_") {
            assert!(
                wanted.contains(tag),
                "{SERVER_PAGE}: ENVIRONMENT documents {tag}, which no flag reads"
            );
        }
    }
}

#[test]
fn ctl_page_sections_and_version() {
    let page = Page::load(CTL_PAGE);
    page.check_sections(CTL_SECTIONS);
    page.check_version();
}

/// Each command's options are in its own OPTIONS subsection and in SYNOPSIS; the rest of
/// OPTIONS (intro, `--help`) and SYNOPSIS name only flags some command has.
#[test]
fn ctl_page_documents_every_command_option_and_only_those() {
    let page = Page::load(CTL_PAGE);
    // The server flags that mvpsctl's options may refer to (txn is bounded by them).
    let server_flags: Vec<&str> = FLAGS.iter().map(|(f, _)| *f).collect();
    let synopsis = long_flags(&page.section("SYNOPSIS").text());
    let mut all_flags: BTreeSet<String> = BTreeSet::new();
    let mut scopes = vec![String::new()];
    for cmd in ctl_commands() {
        let help = help_options(&ctl_help(&[&cmd]));
        let scope = format!("mvpsctl {cmd}");
        check_options(&page, Some(&scope), &help, &server_flags, &[]);
        for (flag, _) in &help {
            assert!(
                BUILTIN_FLAGS.contains(&flag.as_str()) || synopsis.contains(flag),
                "{CTL_PAGE}: SYNOPSIS lacks --{flag} of mvpsctl {cmd}"
            );
            all_flags.insert(flag.clone());
        }
        scopes.push(scope);
    }
    for f in &synopsis {
        assert!(
            all_flags.contains(f),
            "{CTL_PAGE}: SYNOPSIS names --{f}, which no mvpsctl command has"
        );
    }
    for part in page.section("OPTIONS").subsections() {
        if scopes.contains(&part.name) && !part.name.is_empty() {
            continue; // checked above
        }
        for f in long_flags(&part.text()) {
            assert!(
                all_flags.contains(&f),
                "{CTL_PAGE}: OPTIONS ({:?}) mentions --{f}, which no mvpsctl command has",
                part.name
            );
        }
    }
}

#[test]
fn ctl_page_documents_environment_and_txn_exit_codes() {
    let page = Page::load(CTL_PAGE);
    let env = page.section("ENVIRONMENT").items();
    for var in ["MVPS_TE_JWT_SECRET", "MVPS_TOKEN"] {
        assert!(
            env.iter().any(|(tag, _)| tag == var),
            "{CTL_PAGE}: ENVIRONMENT has no item for {var}"
        );
    }
    let codes = help_block_words(&ctl_help(&["txn"]), "Error codes:");
    for want in ["0", "1", "3", "4"] {
        assert!(
            codes.iter().any(|c| c == want),
            "mvpsctl txn --help lists exit codes {codes:?}, expected {want} among them"
        );
    }
    let status = page.section("EXIT STATUS").items();
    for code in &codes {
        assert!(
            status.iter().any(|(tag, _)| tag == code),
            "{CTL_PAGE}: EXIT STATUS has no item for {code}, an exit code of mvpsctl txn"
        );
    }
}

fn gc_help() -> String {
    match mvps_s3_gc::Options::from_args(&["mvps-s3-gc"], &["--help"]) {
        Err(e) => e.output,
        Ok(_) => panic!("--help parsed as options"),
    }
}

#[test]
fn gc_page_sections_and_version() {
    let page = Page::load(GC_PAGE);
    page.check_sections(GC_SECTIONS);
    page.check_version();
}

#[test]
fn gc_page_documents_every_flag_variable_and_exit_code() {
    let page = Page::load(GC_PAGE);
    let help = help_options(&gc_help());
    for (flag, _) in mvps_s3_gc::FLAGS {
        assert!(
            help.iter().any(|(f, _)| f == flag),
            "mvps_s3_gc::FLAGS has --{flag}, --help does not"
        );
    }
    for (flag, _) in &help {
        assert!(
            BUILTIN_FLAGS.contains(&flag.as_str())
                || mvps_s3_gc::FLAGS.iter().any(|(f, _)| f == flag),
            "--{flag} is in --help but not in mvps_s3_gc::FLAGS (no environment variable)"
        );
    }
    check_options(&page, None, &help, &[], &["ENVIRONMENT", "SYNOPSIS"]);

    let env = page.section("ENVIRONMENT").items();
    let item = |var: &str| {
        env.iter()
            .find(|(tag, _)| tag == var)
            .map(|(_, b)| b.clone())
    };
    let mut wanted = BTreeSet::new();
    for (flag, _) in mvps_s3_gc::FLAGS {
        let var = env_name(mvps_s3_gc::ENV_PREFIX, flag);
        let body = item(&var)
            .unwrap_or_else(|| panic!("{GC_PAGE}: ENVIRONMENT has no item for {var} (--{flag})"));
        assert!(
            long_flags(&body).iter().any(|f| f == flag),
            "{GC_PAGE}: the ENVIRONMENT item {var} should refer to --{flag}:\n{body}"
        );
        wanted.insert(var);
    }
    // `.TQ` joins the credential variables under one item: look in the section's text.
    let text = page.section("ENVIRONMENT").text();
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "S3_ENDPOINT",
        mvps::catalog::MIN_BLOB_AGE_ENV,
    ] {
        assert!(
            contains_word(&text, var),
            "{GC_PAGE}: ENVIRONMENT does not name {var}"
        );
    }
    for (tag, _) in &env {
        if tag.starts_with(mvps_s3_gc::ENV_PREFIX) {
            assert!(
                wanted.contains(tag),
                "{GC_PAGE}: ENVIRONMENT documents {tag}, which no flag reads"
            );
        }
    }
    let status = page.section("EXIT STATUS").items();
    for code in [
        mvps_s3_gc::EXIT_OK,
        mvps_s3_gc::EXIT_ERROR,
        mvps_s3_gc::EXIT_STOP,
    ] {
        assert!(
            status.iter().any(|(tag, _)| tag == &code.to_string()),
            "{GC_PAGE}: EXIT STATUS has no item for {code}"
        );
    }
}

/// `groff -man -ww -z` prints nothing for a clean page. groff comes with man-db
/// (Debian package groff-base).
#[test]
fn pages_format_without_groff_warnings() {
    for path in [SERVER_PAGE, CTL_PAGE, GC_PAGE] {
        let full = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path);
        let out = Command::new("groff")
            .args(["-man", "-ww", "-z"])
            .arg(&full)
            .output()
            .unwrap_or_else(|e| panic!("cannot run groff ({e}): install groff-base"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "{path}: groff warnings:\n{stderr}"
        );
    }
}

// ------------------------------------------------------------------- the checks' own tests

#[test]
fn renderer_and_parsers() {
    assert_eq!(
        unescape(r"\fB\-\-listen\fR \fIADDR\fP \(ha\e"),
        r"--listen ADDR ^\"
    );
    let lines = render(".BR \\-\\-a \", \" \\-\\-b\n.IR <x> /y.\n.\\\" comment\nplain \\-\\-c\n");
    let text: Vec<String> = lines
        .iter()
        .filter_map(|l| {
            if let Line::Text(t) = l {
                Some(t.clone())
            } else {
                None
            }
        })
        .collect();
    assert_eq!(text, vec!["--a, --b", "<x>/y.", "plain --c"]);
    assert_eq!(
        long_flags("--image-store s3, --x=1 a--b ---"),
        vec!["image-store", "x"]
    );
    assert!(contains_word("Default: 12 (4 KiB)", "Default: 12"));
    assert!(!contains_word("Default: 123", "Default: 12"));
    assert_eq!(
        help_default("log2, 9..=16 (default 12: 4 KiB pages)").as_deref(),
        Some("12")
    );
    assert_eq!(
        help_default("x (default 127.0.0.1:10809)").as_deref(),
        Some("127.0.0.1:10809")
    );
    assert_eq!(
        help_default("(default 268435456; unused)").as_deref(),
        Some("268435456")
    );
    assert_eq!(help_default("local (default) or s3"), None);
    let h = "Usage: x\n\nOptions:\n  --a-b             one\n                    two\n  --long-flag-name\n                    three\n  --help, help      display\n\n";
    let b = "Usage: x\n\nCommands:\n  token             Print a\n                    token.\n  txn               Run\n\nError codes:\n  0 ok\n  4 conflict\n";
    assert_eq!(help_block_words(b, "Commands:"), vec!["token", "txn"]);
    assert_eq!(help_block_words(b, "Error codes:"), vec!["0", "4"]);
    let sec = Section {
        name: "OPTIONS".into(),
        lines: render(
            "intro\n.SS mvpsctl a\n.TP\n.B \\-\\-x\nbody\n.SS Every command\n.TP\n.B \\-\\-help\n",
        ),
    };
    let parts: Vec<(String, usize)> = sec
        .subsections()
        .iter()
        .map(|p| (p.name.clone(), p.items().len()))
        .collect();
    assert_eq!(
        parts,
        vec![
            (String::new(), 0),
            ("mvpsctl a".to_string(), 1),
            ("Every command".to_string(), 1)
        ]
    );
    assert_eq!(
        help_options(h),
        vec![
            ("a-b".to_string(), "one two".to_string()),
            ("long-flag-name".to_string(), " three".to_string()),
            ("help".to_string(), "help      display".to_string()),
        ]
    );
}
