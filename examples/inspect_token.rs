//! Decode a join token and show what it grants, without touching the host.
//!
//! ```text
//! cargo run --example inspect_token -- tun1_...
//! tunnel serve ... | cargo run --example inspect_token
//! ```

use std::io::Read;
use std::time::SystemTime;
use tunnel::token::Token;

fn main() {
    let text = match std::env::args().nth(1) {
        Some(t) => t,
        None => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).expect("read stdin");
            s
        }
    };
    let token = match Token::decode(text.lines().next().unwrap_or("")) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    println!("server public key : {}", token.server_public_key);
    println!(
        "server endpoint   : {} (port {})",
        token
            .endpoint_hint
            .as_deref()
            .unwrap_or("(no hint: give it to join)"),
        token.port
    );
    println!("tunnel subnet     : {}", token.subnet);
    println!("server address    : {}", token.server_address);
    println!("your address      : {}", token.assigned_network());
    println!(
        "invite key        : public {} (private half redacted)",
        token.invite_key.public_key()
    );
    let expires = token
        .expires_at()
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_else(|| format!("{} s after 1970", token.expires));
    match token.check_expiry(SystemTime::now()) {
        Ok(()) => println!("expires           : {expires}"),
        Err(e) => println!("expires           : {expires} ({e})"),
    }
}
