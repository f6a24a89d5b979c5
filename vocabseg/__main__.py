"""``python -m vocabseg ...`` (also what ``torchrun ... -m vocabseg train CONFIG`` runs)."""

from .cli import main

if __name__ == "__main__":
    main()
