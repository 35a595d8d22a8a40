"""statescale's benchmarks. Not collected by pytest; each prints tables and JSON."""
