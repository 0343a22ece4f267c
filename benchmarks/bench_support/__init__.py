"""What the benchmark scripts share and that is not the library's: their report files."""
