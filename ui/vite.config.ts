// Vite config. `--mode mock` (npm run dev:mock / build:mock) installs the in-memory backend of
// src/services/mock.ts so the UI runs in a plain browser; the default mode builds the app that
// Tauri serves from ui/dist, with no trace of the mock (tests/run checks that).
import { defineConfig } from 'vite';
import { svelte } from '@sveltejs/vite-plugin-svelte';

export default defineConfig(({ mode }) => ({
  plugins: [svelte()],
  // Relative asset URLs: the same build works from tauri://localhost and from a test server.
  base: './',
  clearScreen: false,
  server: { port: 1420, strictPort: true },
  build: {
    outDir: mode === 'mock' ? 'dist-mock' : 'dist',
    emptyOutDir: true,
    target: 'es2022',
    sourcemap: mode === 'mock',
  },
}));
