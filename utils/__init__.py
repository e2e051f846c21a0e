"""The helpers every layer imports (errors, atomic run files); they import no other module of this project."""
