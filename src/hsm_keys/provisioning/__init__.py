"""Provisioning: onboarding of customer accounts, the account registry, and the management scope."""
