import nextJest from "next/jest.js";

const createJestConfig = nextJest({ dir: "./" });

export default createJestConfig({
  testEnvironment: "jsdom",
  testMatch: ["<rootDir>/__tests__/**/*.test.tsx"],
  moduleNameMapper: {
    "^@/(.*)$": "<rootDir>/$1",
    // The client is ESM only ("import" export); jest loads its build, which SWC turns into
    // CommonJS (it lies outside node_modules once the link is resolved).
    "^@notify-engine/client$": "<rootDir>/../../clients/typescript/dist/src/index.js",
  },
});
