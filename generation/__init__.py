"""The generation stage: rephrases, rationales, megadocs and export to token stores."""
