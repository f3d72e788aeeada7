#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    relaygate::cmd::main()
}
