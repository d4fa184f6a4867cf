-- The EFGS trust anchor of a target: the certificate(s) whose key signs every country's registered signing
-- certificate (the audit's signingCertificateOperatorSignature). Without it a pull cannot tell a country's real
-- signing certificate from one the gateway made itself, so pulls refuse to run for a target that has none.
ALTER TABLE efgs_target ADD COLUMN trust_anchor TEXT;   -- PEM bundle
