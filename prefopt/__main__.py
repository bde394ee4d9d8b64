"""`python -m prefopt ...` (and `accelerate launch -m prefopt ...`): the same commands as the `prefopt` script."""

from prefopt.cli import app

if __name__ == "__main__":
    app(prog_name="prefopt")
