// mimalloc: fewer instructions per allocation than glibc's malloc, and memory
// returned to the system instead of held in per-thread arenas (measured: see
// the README's Performance section).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    keygate::cli::main()
}
