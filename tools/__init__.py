"""graphprune's command-line programs (absl apps), installed as graphprune.tools."""
