"""HTTP wire formats: each dialect parses requests into the internal ones and formats results."""
