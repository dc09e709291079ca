// Entry point. In `--mode mock` (npm run dev:mock, the browser tests) the in-memory backend is
// installed first; in the app build that branch is removed at build time.
import './styles/app.css';
import { mount } from 'svelte';
import App from './App.svelte';

async function start() {
  if (import.meta.env.MODE === 'mock') {
    const { installMockBackend } = await import('./services/mock');
    installMockBackend(new URLSearchParams(location.search));
  }
  const target = document.getElementById('app');
  if (target) mount(App, { target });
}

void start();
