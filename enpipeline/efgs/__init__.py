"""EFGS: exchange keys with the EU Federation Gateway Service (upload batches with CMS signatures, download chains
verified against the audit endpoint)."""
