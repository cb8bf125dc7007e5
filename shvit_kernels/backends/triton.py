"""triton backend: registration pending."""
