"""Background pull jobs (see issue: explicit pulls as persistent jobs)."""
