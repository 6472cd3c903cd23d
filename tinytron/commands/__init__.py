"""Command lines, each a console script (pyproject.toml) and `python -m tinytron.commands.<name>`:
tinytron-tokenize, tinytron-plan, tinytron-plot, tinytron-export, tinytron-generate. Training itself
starts from the root scripts (pretrain_debug.py, pretrain_example.py) through torchrun."""
