"""cuda backend: registration pending."""
