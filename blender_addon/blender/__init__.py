"""The add-on's bpy half: properties, preferences, operators, panels, the timer pump."""
