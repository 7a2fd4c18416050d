"""disttrain's benchmark harness (`python -m bench`); results in bench/RESULTS.md."""
