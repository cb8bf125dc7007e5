"""cpp backend: registration pending."""
