"""`python -m prefopt ...` (and `accelerate launch -m prefopt ...`) and the `prefopt` script: the typer commands of
:mod:`prefopt.cli`, in a process re-executed under jemalloc first where it is installed (:mod:`prefopt._alloc`)."""

import sys


def main() -> None:
    from prefopt._alloc import AllocatorError, use_allocator

    try:
        use_allocator()
    except AllocatorError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    from prefopt.cli import app

    app(prog_name="prefopt")


if __name__ == "__main__":
    main()
