fn main() -> std::process::ExitCode {
    genpipe::cli::main()
}
