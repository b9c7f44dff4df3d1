"""The add-on's bpy-free half: frame conversions, mesh and texture layouts, job records, batch
prompts. Plain numpy and the standard library, tested without Blender (the glTF add-on's io/)."""
