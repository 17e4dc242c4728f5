"""Process plumbing shared by every role: lifecycle, retry, health, HTTP, metrics, logs, redaction, tuning."""
