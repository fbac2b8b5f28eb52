import path from "node:path";
import { fileURLToPath } from "node:url";

// The client package lives in this repository (clients/typescript, linked by npm): the
// bundler's root is the repository, so it may follow the link.
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");

/** @type {import('next').NextConfig} */
export default {
  turbopack: { root },
  outputFileTracingRoot: root,
  transpilePackages: ["@notify-engine/client"],
};
