"""File types the studio reads, shared by the dataset scan and the annotators; imports nothing from the project."""

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
