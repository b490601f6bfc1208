"""Protection methods: each a pure compiled core with a frozen config and named presets."""
