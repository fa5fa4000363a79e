"""DreamTeacher pipeline glue: typed config, CLI, demo."""
