//! Command-line usage errors: exit code 1 like every other error (0 for
//! `--help` and `--version`), and a bad value of a closed choice on one line
//! that names the flag and its valid values.

use clap::error::{ContextKind, ContextValue, ErrorKind};

/// `--flag value: not a valid value (valid values: a, b, c)`, for a value
/// outside a closed choice, and `--flag: needs a value` for a missing or empty one;
/// None for every other error.
fn invalid_choice(e: &clap::Error) -> Option<String> {
    if e.kind() != ErrorKind::InvalidValue {
        return None;
    }
    let ContextValue::String(arg) = e.get(ContextKind::InvalidArg)? else {
        return None;
    };
    let ContextValue::String(value) = e.get(ContextKind::InvalidValue)? else {
        return None;
    };
    let ContextValue::Strings(valid) = e.get(ContextKind::ValidValue)? else {
        return None;
    };
    // clap names the argument with its placeholder: "--device <DEVICE>".
    let flag = arg.split_whitespace().next().unwrap_or(arg);
    if valid.is_empty() {
        // Not a choice: a path (or another argument that refuses "") given
        // none or an empty one.
        return Some(format!("{flag}: needs a value"));
    }
    Some(format!(
        "{flag} {value}: not a valid value (valid values: {})",
        valid.join(", ")
    ))
}

/// Report a failed parse and end the process.
pub fn exit(e: clap::Error) -> ! {
    if !e.use_stderr() {
        // --help, --version: their text on stdout, success.
        let _ = e.print();
        std::process::exit(0);
    }
    match invalid_choice(&e) {
        Some(line) => eprintln!("error: {line}"),
        None => {
            let _ = e.print();
        }
    }
    std::process::exit(1);
}
