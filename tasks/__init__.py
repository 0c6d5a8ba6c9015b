"""Easy-to-hard tasks generated locally from a seed (prefix sums, sudoku, chess)."""
