"""python -m octo.generate --checkpoint DIR --prompt "Once upon a time" (octo.generation.main)."""

from octo.generation import main

if __name__ == "__main__":
    raise SystemExit(main())
