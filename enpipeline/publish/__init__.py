"""The publish path: validate and transform uploaded TEKs, verify, revise, store."""
