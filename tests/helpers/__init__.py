"""What tests share: paths to the repository's own test data, subprocess helpers, distributed runners,
real checkpoints and the golden-loss file. Import from the submodules (``tests.helpers.paths``, ...)."""
